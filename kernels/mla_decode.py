"""Multi-head latent attention decode (DeepSeek V2/V3, absorbed form) over a paged latent cache, in
Triton.

Every head of a sequence attends over the same cached rows [latent (L) | rope key (R)], one row per
token (page size 1, found through the slot table): score = scale * q[h] . row, and the value is the
row's latent part. So q [B, H, L + R] is q_nope already multiplied into latent space, followed by the
rotated q_pe; the output [B, H, L] is still in latent space (the caller applies W_UV).

Split-KV, like decode_attention.py: stage 1, grid (B, cdiv(H, BLOCK_H), num_splits), takes BLOCK_H
heads of one sequence over one contiguous split of its positions; each row block is loaded once for
all those heads (the scores are two tl.dot, latent and rope part, so L and R need not be one power of
two) and an online softmax is kept in float32. It writes fp32 partial outputs [B, H, S, L] and their
log-sum-exp, which decode_attention's stage 2 merges. The launch shape depends on (B, H, num_splits)
alone and the lengths are read from device tensors, so a CUDA graph can capture it.

An fp8 cache holds row / k_scale: k_scale folds into the softmax scale and multiplies the output.

mla_decode_ref is the torch reference (gather per sequence, dequantize, fp32 softmax).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from radixserve.kernels.decode_attention import merge_splits, num_splits_for_batch
from radixserve.kernels.paged_attention_block import check_kv_dtype, interpreting, num_sms


@triton.jit
def _mla_block(
    q_lat,
    q_pe,
    cache_ptr,
    slot_row,
    n0,
    end,
    m_i,
    l_i,
    acc,
    scale,
    stride_c,
    LORA: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Positions [n0, min(n0 + BLOCK_N, end)), n0 < end, folded into the running (m_i, l_i, acc)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    pos = n0 + offs_n
    n_mask = pos < end
    slots = tl.load(slot_row + pos, mask=n_mask, other=0).to(tl.int64)
    row = cache_ptr + slots[:, None] * stride_c
    lat = tl.load(row + offs_l[None, :], mask=n_mask[:, None] & (offs_l < LORA)[None, :], other=0.0)
    pe = tl.load(
        row + LORA + offs_r[None, :], mask=n_mask[:, None] & (offs_r < ROPE)[None, :], other=0.0
    )
    lat = lat.to(q_lat.dtype)
    qk = tl.dot(q_lat, tl.trans(lat), input_precision=PRECISION)
    qk += tl.dot(q_pe, tl.trans(pe.to(q_pe.dtype)), input_precision=PRECISION)
    qk = tl.where(n_mask[None, :], qk * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize_on_alignment=["rows_ptr", "lens_ptr"])
def _mla_stage1(
    q_ptr,
    cache_ptr,
    slot_ptr,
    rows_ptr,
    lens_ptr,
    part_ptr,
    lse_ptr,
    scale,
    out_scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_c,
    stride_tb,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    NUM_HEADS: tl.constexpr,
    LORA: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_WHILE: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = s * split_len
    end = tl.minimum(start + split_len, seq_len)

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads < NUM_HEADS
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    b64 = b.to(tl.int64)
    q_row = q_ptr + b64 * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(
        q_row + offs_l[None, :], mask=h_mask[:, None] & (offs_l < LORA)[None, :], other=0.0
    )
    q_pe = tl.load(
        q_row + LORA + offs_r[None, :], mask=h_mask[:, None] & (offs_r < ROPE)[None, :], other=0.0
    )

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], tl.float32)
    slot_row = slot_ptr + tl.load(rows_ptr + b).to(tl.int64) * stride_tb
    if USE_WHILE:  # the interpreter cannot run `range` over runtime bounds
        n0 = start
        while n0 < end:
            m_i, l_i, acc = _mla_block(
                q_lat, q_pe, cache_ptr, slot_row, n0, end, m_i, l_i, acc, scale, stride_c,
                LORA, ROPE, BLOCK_N, BLOCK_L, BLOCK_R, PRECISION,
            )  # fmt: skip
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _mla_block(
                q_lat, q_pe, cache_ptr, slot_row, n0, end, m_i, l_i, acc, scale, stride_c,
                LORA, ROPE, BLOCK_N, BLOCK_L, BLOCK_R, PRECISION,
            )  # fmt: skip

    has = l_i > 0
    out = acc * (out_scale / tl.where(has, l_i, 1.0))[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(
        part_ptr + b64 * stride_pb + heads[:, None] * stride_ph + s * stride_ps + offs_l[None, :],
        out,
        mask=h_mask[:, None] & (offs_l < LORA)[None, :],
    )
    tl.store(lse_ptr + b64 * stride_lb + heads * stride_lh + s, lse, mask=h_mask)


def mla_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    slot_table: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    k_scale: float = 1.0,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """o[b, h] = softmax(scale * q[b, h] . C_b^T) C_b[:, :kv_lora_rank], C_b = cache rows
    slot_table[rows[b], :seq_lens[b]] times k_scale.

    q [B, H, L + R]; cache [num_slots, L + R] (or [num_slots, 1, L + R]) in q's dtype or fp8;
    slot_table [R_rows, width] int; rows, seq_lens [B] int. Returns [B, H, L] in q's dtype.
    num_splits defaults to a function of (B, H) only (CUDA-graph safe)."""
    if cache.dim() == 3:
        cache = cache.view(cache.shape[0], -1)
    B, H, D = q.shape
    lora, rope = kv_lora_rank, D - kv_lora_rank
    assert cache.shape[1] == D and rope > 0, (cache.shape, D, kv_lora_rank)
    assert rows.shape == (B,) and seq_lens.shape == (B,)
    check_kv_dtype(q, cache, cache)
    q = q if q.stride(2) == 1 else q.contiguous()
    assert cache.stride(1) == 1 and slot_table.stride(1) == 1
    BLOCK_H = 16
    head_blocks = triton.cdiv(H, BLOCK_H)
    if num_splits is None:
        num_splits = num_splits_for_batch(B, head_blocks, num_sms(q.device))
    BLOCK_L = max(16, triton.next_power_of_2(lora))
    BLOCK_R = max(16, triton.next_power_of_2(rope))
    BLOCK_N = block_n or (16 if BLOCK_L >= 512 else 32)
    o = torch.empty((B, H, lora), dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    part = torch.empty((B, H, num_splits, lora), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    _mla_stage1[(B, head_blocks, num_splits)](
        q,
        cache,
        slot_table,
        rows,
        seq_lens,
        part,
        lse,
        float(scale) * float(k_scale),
        float(k_scale),
        num_splits,
        q.stride(0),
        q.stride(1),
        cache.stride(0),
        slot_table.stride(0),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        NUM_HEADS=H,
        LORA=lora,
        ROPE=rope,
        BLOCK_H=BLOCK_H,
        BLOCK_N=BLOCK_N,
        BLOCK_L=BLOCK_L,
        BLOCK_R=BLOCK_R,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_WHILE=interpreting(),
        num_warps=4,
        num_stages=2,
    )
    merge_splits(part, lse, o, num_splits, lora, BLOCK_L)
    return o


def mla_decode_ref(
    q: torch.Tensor,
    cache: torch.Tensor,
    slot_table: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    k_scale: float = 1.0,
) -> torch.Tensor:
    """Torch reference: per sequence, gather its rows, dequantize, fp32 softmax over all heads."""
    cache = cache.reshape(cache.shape[0], -1)
    B, H, _ = q.shape
    o = torch.zeros((B, H, kv_lora_rank), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        c = cache[slot_table[int(rows[b]), :n].long()].float() * k_scale  # [n, L + R]
        p = torch.softmax(q[b].float() @ c.t() * scale, dim=-1)
        o[b] = p @ c[:, :kv_lora_rank]
    return o.to(q.dtype)
