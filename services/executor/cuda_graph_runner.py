"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step's kernels depend only on its batch size (the attention backend reads lengths and
slot-table rows from device tensors), so each bucket is captured once at start, embeddings to
logits, over static input buffers. A step of B requests runs the smallest bucket >= B: its inputs
are copied into the first B entries and the padding entries are made inert (KV slot -1: not
stored; length 0: nothing read). All graphs share one memory pool, captured largest first.
With --enable-torch-compile the buckets up to its max batch size run the compiled forward
(torch_compile.py): it is compiled for the bucket by the warm-up runs before the capture, then captured.

An EAGLE / EAGLE3 draft head reads the target's hidden states (eagle_step.py), which a graph would
otherwise free inside itself: with keep_hidden each bucket also keeps, as static outputs, the final
hidden rows (the LM head's input) and, when the model captures layer inputs (EAGLE3's
capture_hidden_layers), its captured_hidden rows. A replay hands them over as the eager forward does:
the step's rows in the step's order, the bucket's padding rows cut off (GraphOutputs.live).
Without a head nothing more is kept.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from radixserve.executor.attention.metadata import ForwardBatch, TableMeta, forward_context

log = logging.getLogger("radixserve.executor.cuda_graph")

BUCKETS = [1, 2, 4, 8, 12] + list(range(16, 257, 8)) + list(range(272, 1025, 16))


@dataclass
class GraphOutputs:
    """A bucket's static outputs (rows past the step's are the padding's), or a replay's live rows."""

    logits: torch.Tensor  # [rows, vocab] float32
    hidden: torch.Tensor | None = None  # [rows, H] the final hidden states (keep_hidden)
    captured: torch.Tensor | None = None  # [rows, n * H] model.captured_hidden (EAGLE3)

    def live(self, bs: int) -> "GraphOutputs":
        """The first bs rows of each output: a step's rows, in its order (views, no copy; the next
        replay overwrites them)."""
        return GraphOutputs(
            self.logits[:bs],
            None if self.hidden is None else self.hidden[:bs],
            None if self.captured is None else self.captured[:bs],
        )


def graph_buckets(max_bs: int) -> list[int]:
    buckets = [b for b in BUCKETS if b <= max_bs]
    if not buckets or buckets[-1] != max_bs:
        buckets.append(max_bs)
    return buckets


class BucketGraphs:
    """What the graph runners share (this one and eagle_graphs.py's): a bucket per batch size, each
    bucket's forward (_run) recorded once over static buffers."""

    buckets: list[int]

    def bucket(self, bs: int) -> int:
        """The smallest bucket of at least bs rows."""
        return self.buckets[bisect.bisect_left(self.buckets, bs)]

    def _run(self, batch: ForwardBatch):
        raise NotImplementedError

    def _static_batch(self, bs: int, table, kv_pool, attn_backend) -> ForwardBatch:
        """A bucket's decode step of bs rows over the static input buffers (input_ids, positions,
        out_slots, rows, lens: the subclass's; decode_lens is not read by graph-safe backends)."""
        meta = TableMeta(
            table, self.rows[:bs], self.lens[:bs], self._empty, self._empty, self._empty, 0
        )
        return ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_slots=self.out_slots[:bs],
            extend_seqs=[],
            num_extend_tokens=0,
            decode_lens=[],
            kv_pool=kv_pool,
            attn_backend=attn_backend,
            table_meta=meta,
        )

    def _graph_pool(self):
        return torch.cuda.graph_pool_handle()

    def _record(self, batch: ForwardBatch, pool):
        """The bucket's graph and its static outputs (inside the bucket's forward_context)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # Compiles (torch.compile, Triton) and autotunes for this shape outside the capture.
            for _ in range(2):
                self._run(batch)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = self._run(batch)
        return graph, outputs


class CudaGraphRunner(BucketGraphs):
    def __init__(
        self,
        model,
        kv_pool,
        attn_backend,
        slot_table,
        max_bs: int,
        device: torch.device,
        compiled=None,
        lora=None,
        keep_hidden: bool = False,
    ):
        """compiled: a CompiledDecode (torch_compile.py), run for the buckets up to its max_bs.
        lora: the runner's LoraManager: its kernels read the per-token slot ids from a fixed buffer.
        keep_hidden: also keep the hidden rows a draft head reads (GraphOutputs; the plain forward
        only: the compiled one returns logits)."""
        if keep_hidden and compiled is not None:
            raise ValueError("the compiled decode forward keeps no hidden states for a draft head")
        self.lora, self.keep_hidden = lora, keep_hidden
        self.model, self.kv_pool, self.attn_backend, self.slot_table = (
            model,
            kv_pool,
            attn_backend,
            slot_table,
        )
        self.buckets = graph_buckets(max_bs)
        self.compiled = compiled
        self.max_bs = self.buckets[-1]
        n = self.max_bs
        as_long = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(n, **as_long)
        self.positions = torch.zeros(n, **as_long)
        self.out_slots = torch.full((n,), -1, **as_long)
        self.rows = torch.zeros(n, **as_long)
        self.lens = torch.zeros(n, **as_long)
        self._empty = torch.zeros(0, **as_long)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, GraphOutputs] = {}
        t0 = time.perf_counter()
        pool = self._graph_pool()
        for bs in reversed(self.buckets):
            self.graphs[bs], self.outputs[bs] = self._capture(bs, pool)
        log.info(
            "captured %d CUDA graphs (batch sizes %d..%d%s) in %.1fs",
            len(self.buckets),
            self.buckets[0],
            self.max_bs,
            ", hidden states kept" if keep_hidden else "",
            time.perf_counter() - t0,
        )

    def _forward_batch(self, bs: int) -> ForwardBatch:
        return self._static_batch(bs, self.slot_table.tensor, self.kv_pool, self.attn_backend)

    def _run(self, batch: ForwardBatch) -> GraphOutputs:
        if self.compiled is not None and batch.num_tokens <= self.compiled.max_bs:
            return GraphOutputs(self.compiled(batch.input_ids, batch.positions))
        hidden = self.model(batch.input_ids, batch.positions)
        logits = self.model.compute_logits(hidden)
        if not self.keep_hidden:
            return GraphOutputs(logits)
        capture = getattr(self.model, "capture_hidden_layers", ())
        captured = self.model.captured_hidden if capture else None
        return GraphOutputs(logits, hidden, captured)

    def _capture(self, bs: int, pool) -> tuple[torch.cuda.CUDAGraph, GraphOutputs]:
        lora = self.lora.graph_capture(bs, self.max_bs) if self.lora else contextlib.nullcontext()
        with lora, forward_context(self._forward_batch(bs)) as batch:
            return self._record(batch, pool)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.num_extend_tokens == 0 and 0 < batch.num_tokens <= self.max_bs

    def replay(self, batch: ForwardBatch) -> GraphOutputs:
        """The outputs of a decode step of B <= max_bs tokens, B rows each: logits [B, vocab]
        (float32), and with keep_hidden the hidden rows (the replay's buffers: read them before the
        next replay)."""
        bs = batch.num_tokens
        bucket = self.bucket(bs)
        meta = batch.table_meta
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.out_slots[:bs].copy_(batch.out_slots)
        self.rows[:bs].copy_(meta.seq_rows)
        self.lens[:bs].copy_(meta.seq_lens)
        if bucket > bs:
            self.out_slots[bs:bucket].fill_(-1)
            self.lens[bs:bucket].zero_()
        if self.lora is not None:
            self.lora.graph_fill(bs, bucket)
        self.graphs[bucket].replay()
        return self.outputs[bucket].live(bs)
