"""Attention with torch's scaled_dot_product_attention; runs on CPU and CUDA.

Decode tokens of the whole batch gather their K/V through their SlotTable rows, cut at the longest
length ([B, max_len]), into buffers reused by every layer; sequences of one length run as one SDPA
call, sequences of different lengths one call each at its own length (a padded, masked batch computes
a sequence's attention differently in the last bits from the same sequence alone, and a request's
tokens must not change with its batch-mates), as do float32 sequences on the CPU (there a batch of
equal lengths also differs from a sequence alone once torch runs 2+ threads). Grouped-query heads need no K/V expansion for decode:
the query heads sharing a kv head become that kv head's query rows. Extend
sequences run one causal SDPA each, the mask offset by the cached prefix length (their slots read
from their SlotTable row); one of at most DECODE_ROWS_MAX_TOKENS tokens after a prefix (a speculative
verify step) runs each token as a decode step would, so that its rows equal decode's bit for bit.

A layer's sliding window (Attention.sliding_window) only masks: a decode sequence attends to its last
`window` keys (a slice, no mask); extend masks are built once per step and window, at the first layer
that asks. A layer with a logit soft-cap runs the attention in torch ops (SDPA cannot cap the scores),
in HF's eager order: scale, cap, mask, fp32 softmax.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radixserve.executor.attention.backend import AttentionBackend
from radixserve.executor.attention.metadata import ForwardBatch


@dataclass
class _StepMetadata:
    # By sliding window (None: none): per extend sequence its [num_tokens, seq_len] bool mask, None
    # for plain causal attention on the new K/V (no prefix, and no window that cuts anything).
    extend_masks: dict[int | None, list[torch.Tensor | None]]
    extend_slots: list[torch.Tensor | None]  # on the KV device; None where there is no prefix
    decode_table: torch.Tensor | None  # [B * max_len] slot ids (past a sequence's length: unread)
    decode_max_len: int
    decode_lens: list[int] | None  # each sequence's length; None when all are decode_max_len
    k_buf: torch.Tensor | None
    v_buf: torch.Tensor | None


def extend_mask(seq, window: int | None, device) -> torch.Tensor | None:
    """Key j of the sequence is visible to its new token i (at position prefix_len + i) when
    j <= prefix_len + i and, with a window W, j > prefix_len + i - W."""
    if window is not None and window >= seq.seq_len:
        window = None
    if seq.prefix_len == 0 and window is None:
        return None
    ones = torch.ones(seq.num_tokens, seq.seq_len, dtype=torch.bool, device=device)
    mask = ones.tril_(seq.prefix_len)
    return mask if window is None else mask.triu_(seq.prefix_len - window + 1)


def attend(q, k, v, mask, scale: float, softcap: float | None, causal: bool) -> torch.Tensor:
    """Attention of q [N, H, n, d] over k, v [N, H_kv, L, d]; mask [.., n, L] bool; with no mask,
    causal (n == L) or nothing masked."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal and mask is None,
            scale=scale,
            enable_gqa=True,
        )
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril_()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


@contextlib.contextmanager
def one_thread(device: torch.device):
    """On the CPU, torch ops inside run on one thread: a decode-shaped SDPA call of one sequence is
    too small to share, and its bits (float32) depend on the thread count, so decode and verify make
    it alike."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Extend sequences of at most this many new tokens after a cached prefix run their tokens as decode does.
DECODE_ROWS_MAX_TOKENS = 16


class TorchNativeAttentionBackend(AttentionBackend):
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        device = batch.out_slots.device
        table = batch.table_meta.table
        masks = [extend_mask(seq, None, device) for seq in batch.extend_seqs]
        slots = [
            None if seq.prefix_len == 0 else table[seq.row, : seq.seq_len]
            for seq in batch.extend_seqs
        ]
        decode_table = decode_lens = k_buf = v_buf = None
        max_len = 0
        if batch.decode_lens:
            lens = batch.decode_lens
            max_len = max(lens)
            meta = batch.table_meta
            # Entries past a sequence's length are stale slot ids of the row: in range, and not read.
            decode_table = table[:, :max_len].index_select(0, meta.decode_rows).reshape(-1)
            if min(lens) != max_len:
                decode_lens = list(lens)
            pool = batch.kv_pool
            shape = (decode_table.numel(), pool.num_kv_heads, pool.head_dim)
            k_buf = torch.empty(shape, dtype=pool.dtype, device=device)
            v_buf = torch.empty(shape, dtype=pool.dtype, device=device)
        batch.attn_metadata = _StepMetadata(
            {None: masks}, slots, decode_table, max_len, decode_lens, k_buf, v_buf
        )

    @staticmethod
    def _extend_masks(meta: _StepMetadata, batch: ForwardBatch, window: int | None):
        """This step's extend masks for a layer's window, built at first use."""
        if window not in meta.extend_masks:
            device = batch.out_slots.device
            meta.extend_masks[window] = [extend_mask(s, window, device) for s in batch.extend_seqs]
        return meta.extend_masks[window]

    def forward(self, qk, v, rope, layer, batch: ForwardBatch) -> torch.Tensor:
        q, k = self.rotate(qk, rope, layer)
        meta: _StepMetadata = batch.attn_metadata
        pool = batch.kv_pool
        pool.store(layer.layer_id, batch.out_slots, k, v)
        k_cache, v_cache = pool.layer(layer.layer_id)
        k_scale, v_scale = pool.layer_scales(layer.layer_id)

        num_tokens = q.shape[0]
        hidden = layer.num_heads * layer.head_dim
        n_ext = batch.num_extend_tokens
        if n_ext == 0:
            return self._decode(q, k_cache, v_cache, layer, meta, k_scale, v_scale)
        ext_masks = self._extend_masks(meta, batch, layer.sliding_window)
        out = torch.empty(num_tokens, hidden, dtype=q.dtype, device=q.device)
        for seq, mask, slots in zip(batch.extend_seqs, ext_masks, meta.extend_slots):
            end = seq.start + seq.num_tokens
            # 4-D [1, heads, len, dim]: CPU SDPA takes its fast (flash) path only for 4-D inputs.
            qs = q[seq.start : end].transpose(0, 1).unsqueeze(0)
            scale, out_scale = layer.scaling, 1.0
            if slots is None:
                ks, vs = k[seq.start : end], v[seq.start : end]
            else:
                ks = k_cache.index_select(0, slots).to(q.dtype)
                vs = v_cache.index_select(0, slots).to(q.dtype)
                scale, out_scale = scale * k_scale, v_scale
                if seq.num_tokens <= DECODE_ROWS_MAX_TOKENS:
                    out[seq.start : end] = self._as_decode_rows(
                        q[seq.start : end], ks, vs, seq.prefix_len, layer, k_scale, v_scale
                    )
                    continue
            o = attend(
                qs,
                ks.transpose(0, 1).unsqueeze(0),
                vs.transpose(0, 1).unsqueeze(0),
                mask,
                scale,
                layer.logit_softcap,
                causal=True,
            )
            if out_scale != 1.0:
                o = o * out_scale
            out[seq.start : end] = o[0].transpose(0, 1).reshape(seq.num_tokens, hidden)
        if n_ext < num_tokens:
            out[n_ext:] = self._decode(q[n_ext:], k_cache, v_cache, layer, meta, k_scale, v_scale)
        return out

    @staticmethod
    def _as_decode_rows(q, ks, vs, prefix_len: int, layer, k_scale: float, v_scale: float):
        """A few new tokens after a prefix (a speculative verify step), each exactly as a decode step
        at its length computes it (one SDPA call per token over its keys, no mask): a masked extend
        rounds differently in the last bits, and NGRAM's outputs must equal plain decoding's."""
        kvh, d = layer.num_kv_heads, layer.head_dim
        keys, values = ks.unsqueeze(0).transpose(1, 2), vs.unsqueeze(0).transpose(1, 2)
        scale, window = layer.scaling * k_scale, layer.sliding_window
        rows = []
        with one_thread(q.device):
            for t in range(q.shape[0]):
                n = prefix_len + t + 1
                start = 0 if window is None else max(0, n - window)
                rows.append(
                    attend(
                        q[t : t + 1].reshape(1, kvh, layer.num_heads // kvh, d),
                        keys[:, :, start:n],
                        values[:, :, start:n],
                        None,
                        scale,
                        layer.logit_softcap,
                        False,
                    )
                )
        o = torch.cat(rows)
        if v_scale != 1.0:
            o = o * v_scale
        return o.reshape(q.shape[0], layer.num_heads * d)

    @staticmethod
    def _decode(
        q, k_cache, v_cache, layer, meta: _StepMetadata, k_scale: float, v_scale: float
    ) -> torch.Tensor:
        bsz = q.shape[0]
        kvh, d = layer.num_kv_heads, layer.head_dim
        torch.index_select(k_cache, 0, meta.decode_table, out=meta.k_buf)
        torch.index_select(v_cache, 0, meta.decode_table, out=meta.v_buf)
        shape = (bsz, meta.decode_max_len, kvh, d)
        keys = meta.k_buf.to(q.dtype).view(shape).transpose(1, 2)  # to(): no copy unless fp8
        values = meta.v_buf.to(q.dtype).view(shape).transpose(1, 2)
        queries = q.reshape(bsz, kvh, layer.num_heads // kvh, d)
        scale, window = layer.scaling * k_scale, layer.sliding_window

        def attend_last(qs, ks, vs, n: int) -> torch.Tensor:  # over keys [0, n), the window's tail
            start = 0 if window is None else max(0, n - window)
            return attend(
                qs, ks[:, :, start:n], vs[:, :, start:n], None, scale, layer.logit_softcap, False
            )

        # One call per sequence where lengths differ, and for float32 on the CPU: there torch's SDPA
        # with 2+ threads computes a sequence of a batch differently in the last bits than alone.
        # A lone sequence too: these calls are the ones a verify step's tokens make (_as_decode_rows).
        per_sequence = (
            bsz == 1
            or meta.decode_lens is not None
            or (q.dtype == torch.float32 and q.device.type == "cpu")
        )
        if per_sequence:
            lens = meta.decode_lens or [meta.decode_max_len] * bsz
            with one_thread(q.device):
                o = torch.cat(
                    [
                        attend_last(queries[i : i + 1], keys[i : i + 1], values[i : i + 1], n)
                        for i, n in enumerate(lens)
                    ]
                )
        else:
            o = attend_last(queries, keys, values, meta.decode_max_len)
        if v_scale != 1.0:
            o = o * v_scale
        return o.reshape(bsz, layer.num_heads * d)
