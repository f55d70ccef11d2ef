"""Attention with the Triton kernels of kernels/ (CUDA): rotary + KV store, paged extend, paged split-KV decode.

Models hand over q and k unrotated: one kernel per layer rotates q in place and
writes the rotated k and v to the cache (kernels/rotary_kv_store.py), instead of a rotary kernel
then a KV-store kernel; at small batch both are launch-bound. k itself stays unrotated, which is
fine since the attention kernels here read K/V only from the cache.

An fp8 pool (kv_cache.py) is written and read by the same kernels with the layer's K and V scales,
Python floats fixed for the life of the pool, so captured graphs replay them unchanged.

A layer's sliding window and logit soft-cap (Attention) are compile-time constants of the kernels.

Reads the step's sequences from batch.table_meta (the executor's SlotTable rows and lengths, device
tensors), never from host lengths, and launches a fixed set of kernels whose shapes depend only on the token
count and the decode batch size: the decode path can be captured in a CUDA graph as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.kernels.decode_attention import decode_attention, num_splits_for_batch
from radixserve.kernels.extend_attention import extend_attention
from radixserve.kernels.paged_attention_block import num_sms
from radixserve.kernels.rotary_kv_store import rotary_and_store_kv
from radixserve.executor.attention.backend import AttentionBackend
from radixserve.executor.attention.metadata import ForwardBatch
from radixserve.executor.layers.rotary import RopeStep


@dataclass
class _StepMetadata:
    num_splits: int


class TritonAttentionBackend(AttentionBackend):
    supports_cuda_graphs = True
    verify_as_decode_rows = True  # rotary_and_store_kv writes every token's K/V before attention

    def __init__(self, num_kv_heads: int, device: torch.device, max_splits: int = 16):
        self.num_kv_heads = num_kv_heads
        self.num_sms = num_sms(device)
        self.max_splits = max_splits

    def num_splits(self, decode_batch: int) -> int:
        return num_splits_for_batch(decode_batch, self.num_kv_heads, self.num_sms, self.max_splits)

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.table_meta is None:
            raise RuntimeError("the triton attention backend needs the executor's slot table")
        batch.attn_metadata = _StepMetadata(self.num_splits(batch.num_decode))

    def forward(self, qk, v, rope: RopeStep, layer, batch: ForwardBatch) -> torch.Tensor:
        k_cache, v_cache = batch.kv_pool.layer(layer.layer_id)
        k_scale, v_scale = batch.kv_pool.layer_scales(layer.layer_id)
        q, k = qk[:, : layer.num_heads], qk[:, layer.num_heads :]
        rotary_and_store_kv(
            q,
            k,
            v,
            rope.cos_table,
            rope.sin_table,
            rope.positions,
            k_cache,
            v_cache,
            batch.out_slots,
            k_scale,
            v_scale,
        )
        meta = batch.table_meta
        num_tokens = q.shape[0]
        n_ext = batch.num_extend_tokens
        if n_ext == 0:
            return self._decode(q, k_cache, v_cache, layer, batch).view(num_tokens, -1)
        out = torch.empty(
            num_tokens, layer.num_heads, layer.head_dim, dtype=q.dtype, device=q.device
        )
        extend_attention(
            q,
            k_cache,
            v_cache,
            meta.table,
            meta.seq_rows[: meta.num_extends],
            meta.extend_prefix_lens,
            meta.extend_q_starts,
            meta.extend_q_lens,
            meta.max_extend_len,
            layer.scaling,
            out=out,
            k_scale=k_scale,
            v_scale=v_scale,
            window=layer.sliding_window,
            softcap=layer.logit_softcap,
        )
        if n_ext < num_tokens:
            out[n_ext:] = self._decode(q[n_ext:], k_cache, v_cache, layer, batch)
        return out.view(num_tokens, layer.num_heads * layer.head_dim)

    @staticmethod
    def _decode(q, k_cache, v_cache, layer, batch: ForwardBatch) -> torch.Tensor:
        meta = batch.table_meta
        k_scale, v_scale = batch.kv_pool.layer_scales(layer.layer_id)
        return decode_attention(
            q,
            k_cache,
            v_cache,
            meta.table,
            meta.decode_lens,
            layer.scaling,
            num_splits=batch.attn_metadata.num_splits,
            rows=meta.decode_rows,
            k_scale=k_scale,
            v_scale=v_scale,
            window=layer.sliding_window,
            softcap=layer.logit_softcap,
        )
