"""Multi-head latent attention (DeepSeek V2/V3) over the compressed KV cache.

The KV pool (kv_cache.py) holds, per token and layer, one row [latent (kv_lora_rank) | rotated rope
key (qk_rope_head_dim)] as the K tensor of a single kv head; V is zero wide. The up-projection
kv_b_proj (LatentUpProjection) maps a latent to every head's [k_nope | v].

Extend (prefill) tokens attend naively: the sequence's latents (the new ones, plus the prefix's from
the pool) are expanded to per-head K and V, then causal SDPA. Decode tokens attend with the absorbed
projections, never expanding the cache: q_nope goes through W_UK into latent space, so that
q . k = [q_nope W_UK | q_pe] . [latent | k_pe], an MQA over the cached rows whose values are the
latents themselves; the latent output goes back through W_UV. Under the triton attention backend
this decode is kernels/mla_decode.py, else torch over the gathered rows. `absorb = False` makes
decode expand the latents as prefill does (the reference the absorbed path is tested against).

Tensor parallelism splits the heads (q, kv_b_proj, o_proj); the latent and the cache are replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.executor.attention.metadata import ForwardBatch, get_forward_batch
from radixserve.executor.layers.linear import ColumnParallelLinear
from radixserve.executor.parallel_state import tp_size


class LatentUpProjection(ColumnParallelLinear):
    """kv_b_proj: latent [.., kv_lora_rank] -> this rank's heads' [k_nope | v]. After loading it also
    keeps the absorbed weights w_uk [heads, qk_nope, kv_lora_rank] and w_uv_t [heads, kv_lora_rank,
    v_head_dim], taken from the layer's own output on the identity (any weight format gives them)."""

    def __init__(self, kv_lora_rank: int, num_heads: int, qk_nope_dim: int, v_head_dim: int):
        super().__init__(kv_lora_rank, num_heads * (qk_nope_dim + v_head_dim))
        self.num_local_heads = num_heads // tp_size()
        self.qk_nope_dim, self.v_head_dim = qk_nope_dim, v_head_dim
        self.act_dtype = torch.get_default_dtype()
        self.w_uk: torch.Tensor | None = None
        self.w_uv_t: torch.Tensor | None = None

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [S, kv_lora_rank] -> (k_nope [S, heads, qk_nope], v [S, heads, v_head_dim])."""
        kv = self(latent).view(latent.shape[0], self.num_local_heads, -1)
        return kv.split([self.qk_nope_dim, self.v_head_dim], dim=-1)

    def process_weights_after_loading(self) -> None:
        super().process_weights_after_loading()
        self.absorb_weights()

    @torch.no_grad()
    def absorb_weights(self) -> None:
        device = next(self.parameters()).device
        eye = torch.eye(self.in_features, dtype=self.act_dtype, device=device)
        w = self(eye).t().reshape(self.num_local_heads, -1, self.in_features)  # [H, nope + v, L]
        self.w_uk = w[:, : self.qk_nope_dim].contiguous()
        self.w_uv_t = w[:, self.qk_nope_dim :].transpose(1, 2).contiguous()


class MLAAttention(nn.Module):
    def __init__(
        self,
        layer_id: int,
        num_heads: int,
        qk_nope_dim: int,
        qk_rope_dim: int,
        v_head_dim: int,
        kv_lora_rank: int,
        scaling: float,
    ):
        super().__init__()
        self.layer_id, self.num_heads = layer_id, num_heads  # this rank's heads
        self.qk_nope_dim, self.qk_rope_dim, self.v_head_dim = qk_nope_dim, qk_rope_dim, v_head_dim
        self.kv_lora_rank, self.scaling = kv_lora_rank, scaling
        self.absorb = True

    def forward(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        k_pe: torch.Tensor,
        kv_b: LatentUpProjection,
    ) -> torch.Tensor:
        """q_nope [T, heads, qk_nope], q_pe [T, heads, rope] (rotated), latent [T, kv_lora_rank]
        (normed), k_pe [T, rope] (rotated) -> [T, heads * v_head_dim]; stores [latent | k_pe]."""
        batch = get_forward_batch()
        pool = batch.kv_pool
        rows = torch.cat((latent, k_pe), dim=-1).unsqueeze(1)
        # Padding tokens of a captured decode graph carry slot -1: they write to the sink, slot 0
        # (never handed out by the scheduler).
        pool.store(self.layer_id, batch.out_slots.clamp(min=0), rows, rows[..., :0])
        cache = pool.layer(self.layer_id)[0].view(pool.num_slots, -1)
        k_scale = pool.layer_scales(self.layer_id)[0]
        num_tokens, n_ext = q_nope.shape[0], batch.num_extend_tokens
        out = q_nope.new_empty(num_tokens, self.num_heads, self.v_head_dim)
        for seq in batch.extend_seqs:
            end = seq.start + seq.num_tokens
            if seq.prefix_len == 0:
                seq_rows = rows[seq.start : end, 0]
            else:
                slots = batch.table_meta.table[seq.row, : seq.seq_len]
                seq_rows = _read(cache, slots, k_scale, q_nope.dtype)
            out[seq.start : end] = self._extend(
                q_nope[seq.start : end], q_pe[seq.start : end], seq_rows, seq.prefix_len, kv_b
            )
        if n_ext < num_tokens:
            out[n_ext:] = self._decode(q_nope[n_ext:], q_pe[n_ext:], cache, k_scale, kv_b, batch)
        return out.view(num_tokens, -1)

    def _extend(self, q_nope, q_pe, seq_rows, prefix_len: int, kv_b) -> torch.Tensor:
        """Causal attention of n new tokens over the sequence's rows [S, L + rope] (S = prefix + n)."""
        n, s = q_nope.shape[0], seq_rows.shape[0]
        k_nope, v = kv_b.expand(seq_rows[:, : self.kv_lora_rank])
        k_pe = seq_rows[:, None, self.kv_lora_rank :].expand(s, self.num_heads, self.qk_rope_dim)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1).unsqueeze(0)
        k = torch.cat((k_nope, k_pe), dim=-1).transpose(0, 1).unsqueeze(0)
        mask = None
        if prefix_len:
            mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril_(prefix_len)
        o = F.scaled_dot_product_attention(
            q,
            k,
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scaling,
        )
        return o[0].transpose(0, 1)

    def _decode(self, q_nope, q_pe, cache, k_scale: float, kv_b, batch: ForwardBatch):
        """One token per sequence -> [B, heads, v_head_dim]."""
        meta = batch.table_meta
        if not self.absorb:
            return self._decode_expanded(q_nope, q_pe, cache, k_scale, kv_b, batch)
        # [B, H, nope] x [H, nope, L] -> [B, H, L]
        q_lat = torch.bmm(q_nope.transpose(0, 1), kv_b.w_uk).transpose(0, 1)
        q = torch.cat((q_lat, q_pe), dim=-1)
        if _is_triton(batch):
            from radixserve.kernels.mla_decode import mla_decode

            o_lat = mla_decode(
                q,
                cache,
                meta.table,
                meta.decode_rows,
                meta.decode_lens,
                self.scaling,
                self.kv_lora_rank,
                k_scale=k_scale,
            )
        else:
            keys, mask = _gather_decode_rows(cache, batch, k_scale, q.dtype)
            o_lat = F.scaled_dot_product_attention(
                q.unsqueeze(1),
                keys.unsqueeze(1),
                keys[..., : self.kv_lora_rank].unsqueeze(1),
                attn_mask=mask,
                scale=self.scaling,
            )[:, 0]
        # [B, H, L] x [H, L, v] -> [B, H, v]
        return torch.bmm(o_lat.transpose(0, 1).to(q.dtype), kv_b.w_uv_t).transpose(0, 1)

    def _decode_expanded(self, q_nope, q_pe, cache, k_scale, kv_b, batch: ForwardBatch):
        keys, mask = _gather_decode_rows(cache, batch, k_scale, q_nope.dtype)
        bsz, max_len = keys.shape[:2]
        k_nope, v = kv_b.expand(keys[..., : self.kv_lora_rank].reshape(bsz * max_len, -1))
        shape = (bsz, max_len, self.num_heads, -1)
        k_pe = keys[:, :, None, self.kv_lora_rank :].expand(shape[:3] + (self.qk_rope_dim,))
        k = torch.cat((k_nope.view(shape), k_pe), dim=-1).transpose(1, 2)
        q = torch.cat((q_nope, q_pe), dim=-1).unsqueeze(2)  # [B, H, 1, D]
        o = F.scaled_dot_product_attention(
            q, k, v.view(shape).transpose(1, 2), attn_mask=mask, scale=self.scaling
        )
        return o[:, :, 0]


def _is_triton(batch: ForwardBatch) -> bool:
    from radixserve.executor.attention.triton_backend import TritonAttentionBackend

    return isinstance(batch.attn_backend, TritonAttentionBackend)


def _read(cache: torch.Tensor, slots: torch.Tensor, k_scale: float, dtype) -> torch.Tensor:
    """Cached rows at slots, dequantized (an fp8 pool holds row / k_scale)."""
    rows = cache.index_select(0, slots).to(dtype)
    return rows if k_scale == 1.0 else rows * k_scale


def _gather_decode_rows(cache, batch: ForwardBatch, k_scale: float, dtype):
    """The decode sequences' cached rows [B, max_len, L + rope] and the key-padding mask
    [B, 1, 1, max_len] (None when every sequence has max_len rows)."""
    meta, lens = batch.table_meta, batch.decode_lens
    max_len = max(lens)
    slots = meta.table[:, :max_len].index_select(0, meta.decode_rows)
    keys = _read(cache, slots.reshape(-1), k_scale, dtype).view(len(lens), max_len, -1)
    mask = None
    if min(lens) != max_len:
        pos = torch.arange(max_len, device=keys.device)
        mask = (pos[None, :] < meta.decode_lens[:, None]).view(len(lens), 1, 1, max_len)
    return keys, mask
