"""An EAGLE proposer's decode rounds (2..K: eagle_proposer.py) replayed from CUDA graphs, one graph per
bucket of draft requests, beside the target's (cuda_graph_runner.py).

A round is one draft forward per request, one position further, on the head's own output and the token
it proposed last, and the LM head over its (EAGLE3: reduced) vocabulary with the argmax mapped to
target ids: fixed shapes per request count, attention reading only device tensors (a private slot
table, lengths). Each bucket is captured once over static buffers: token ids, positions, scratch
slots, lengths, the hidden rows and the private table ([max_bs, width] slot ids, width the target
table's: one propose call copies its private table in). Padding rows store nothing (slot -1) and read
nothing (length 0). A propose call of B requests fills the first B rows, then per round writes the
round's positions, slots and lengths (its first ones + the round) and the previous round's outputs,
and replays; round 1 (an extend over the kept positions: varying lengths) stays eager. The lengths
come as device tensors (after a verify step they follow the accepted counts, never read on the host).

With a tree proposer (topk > 1, EagleProposer.propose_tree) a row is a branch, not a request, and a
round's outputs are each row's topk (log-probability, target id) instead of its argmax: tree_round
replays one round over the branches' own table rows, positions, slots and hidden rows; the scoring and
the choice of the next branches stay eager (a few small ops on [requests, topk^2]).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from radixserve.executor.attention.metadata import ForwardBatch, forward_context
from radixserve.executor.cuda_graph_runner import BucketGraphs, graph_buckets

log = logging.getLogger("radixserve.executor.eagle_graphs")


@dataclass
class DraftRound:
    """A bucket's static outputs (rows past the call's are the padding's)."""

    tokens: (
        torch.Tensor
    )  # [rows] int64: each request's proposed token, target ids ([rows, topk]: a tree's)
    hidden: torch.Tensor  # [rows, H]: the next round's hidden input
    scores: torch.Tensor | None = None  # a tree's [rows, topk] log-probabilities, likeliest first


class DraftRoundGraphs(BucketGraphs):
    def __init__(self, proposer, max_bs: int, width: int, dtype: torch.dtype):
        """Graphs of proposer's rounds for 1..max_bs rows (requests; a tree's branches) over private
        tables up to width slots, hidden rows in dtype (a head's: a STANDALONE draft model's rounds
        stay eager)."""
        if proposer.extra or proposer.keep_logits:
            raise ValueError("draft-round graphs run a head's rounds, keeping no logits")
        self.proposer = proposer
        self.buckets = graph_buckets(max_bs)
        self.max_bs, self.width = self.buckets[-1], width
        n, device = self.max_bs, proposer.device
        as_long = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(n, **as_long)
        self.positions = torch.zeros(n, **as_long)
        self.out_slots = torch.full((n,), -1, **as_long)
        self.lens = torch.zeros(n, **as_long)
        self.rows = torch.arange(n, **as_long)
        self.table = torch.zeros(n, width, **as_long)
        self.hidden = torch.zeros(n, proposer.draft.hidden_size, dtype=dtype, device=device)
        self._empty = torch.zeros(0, **as_long)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, DraftRound] = {}
        t0 = time.perf_counter()
        pool = self._graph_pool()
        for bs in reversed(self.buckets):
            with forward_context(self._forward_batch(bs)) as batch:
                self.graphs[bs], self.outputs[bs] = self._record(batch, pool)
        log.info(
            "captured %d draft-round CUDA graphs (1..%d requests) in %.1fs",
            len(self.buckets),
            self.max_bs,
            time.perf_counter() - t0,
        )

    def _forward_batch(self, bs: int) -> ForwardBatch:
        return self._static_batch(bs, self.table, self.proposer.kv_pool, self.proposer.attn_backend)

    def _run(self, batch: ForwardBatch) -> DraftRound:
        hidden = self.hidden[: batch.num_tokens]
        if self.proposer.topk > 1:
            to_logits, to_next = self.proposer.draft(batch.input_ids, batch.positions, hidden)
            scores, tokens = self.proposer._top(to_logits)
            return DraftRound(tokens, to_next, scores)
        tokens, hidden = self.proposer.draft_round(batch, hidden)
        return DraftRound(tokens, hidden)

    def can_run(self, num_requests: int, width: int) -> bool:
        return num_requests <= self.max_bs and width <= self.width

    def tree_round(
        self,
        tables: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One round of a tree's R branches (R <= max_bs): each row's table [R, w], position, slot,
        input token and hidden row; returns (scores [R, topk], tokens [R, topk], next hidden [R, H]),
        copies the next replay does not overwrite."""
        rows = tokens.shape[0]
        bucket = self.bucket(rows)
        graph, out = self.graphs[bucket], self.outputs[bucket]
        self.table[:rows, : tables.shape[1]].copy_(tables)
        self.input_ids[:rows].copy_(tokens)
        self.hidden[:rows].copy_(hidden)
        self.positions[:rows].copy_(positions)
        torch.add(positions, 1, out=self.lens[:rows])
        self.out_slots[:rows].copy_(slots)
        self.out_slots[rows:bucket].fill_(-1)
        self.lens[rows:bucket].zero_()
        graph.replay()
        return out.scores[:rows].clone(), out.tokens[:rows].clone(), out.hidden[:rows].clone()

    def rounds(
        self,
        private: torch.Tensor,
        lens: torch.Tensor,
        scratch: torch.Tensor,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        k: int,
    ) -> list[torch.Tensor]:
        """Rounds 2..k of B requests: their tokens [B] each. private: the call's table [B, w];
        lens: [B] each request's positions after round 1 (device: after a verify step they follow
        the accepted counts, which the host does not read); scratch: [B] each one's slot for round
        2 (round j + 1 writes slot + j - 1); tokens, hidden: round 1's outputs [B], [B, H]."""
        bs = lens.shape[0]
        bucket = self.bucket(bs)
        graph, out = self.graphs[bucket], self.outputs[bucket]
        self.table[:bs, : private.shape[1]].copy_(private)
        self.out_slots[bs:bucket].fill_(-1)
        self.lens[bs:bucket].zero_()
        drafts = []
        for j in range(1, k):
            self.input_ids[:bs].copy_(tokens)
            self.hidden[:bs].copy_(hidden)
            torch.add(lens, j, out=self.lens[:bs])
            torch.add(lens, j - 1, out=self.positions[:bs])
            torch.add(scratch, j - 1, out=self.out_slots[:bs])
            graph.replay()
            tokens, hidden = out.tokens[:bs].clone(), out.hidden[:bs]
            drafts.append(tokens)
        return drafts
