"""Paged prefill/extend attention (causal) over a cached prefix, with GQA, in Triton.

Each extend sequence s runs q_lens[s] new tokens at positions prefix_lens[s] .. prefix_lens[s] +
q_lens[s] - 1; its keys and values (the cached prefix and the new tokens, whose K/V the caller
stored first) are read through the slot table: position p of sequence s lives at slot
table[rows[s], p]. Query token i of s sits at row q_starts[s] + i of q and of the output.

Grid (num_seqs, ceil(max_q_len / BLOCK_M), num_heads): one program takes BLOCK_M queries of one
sequence and one head and walks the keys in BLOCK_N blocks up to its last query's position, with an
online softmax in float32 (flash-attention forward). Blocks past a sequence's q_len do nothing, so
one launch covers sequences of any mix of lengths.

An fp8 KV cache is read as decode_attention reads it (k_scale folded into the softmax scale, v_scale
into the output).

A layer's sliding window W (window; 0: off) starts each query block's key walk at its first query's
window and masks per row; a logit soft-cap (softcap) caps the scaled scores. Both are compile-time
constants of the kernel, so neither costs anything when off.

extend_attention_ref is the torch reference (per sequence, dequantized, fp32, explicit causal mask).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.kernels.paged_attention_block import attend_block, check_kv_dtype, interpreting


# The per-sequence arrays are views into the step's packed ints, read one value per program: alignment
# specialization would buy nothing and compile new variants on live traffic.
@triton.jit(do_not_specialize_on_alignment=["rows_ptr", "prefix_ptr", "qstart_ptr", "qlen_ptr"])
def _extend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    table_ptr,
    rows_ptr,
    prefix_ptr,
    qstart_ptr,
    qlen_ptr,
    scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_tr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_WHILE: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    s = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    h = tl.program_id(2)
    q_len = tl.load(qlen_ptr + s).to(tl.int32)
    if m0 < q_len:
        prefix = tl.load(prefix_ptr + s).to(tl.int32)
        q_start = tl.load(qstart_ptr + s).to(tl.int64)
        row = tl.load(rows_ptr + s).to(tl.int64)
        kh = h // GROUP

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        tokens = q_start + offs_m.to(tl.int64)
        q = tl.load(
            q_ptr + tokens[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        q_pos = prefix + offs_m

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        slot_row = table_ptr + row * stride_tr
        kv_end = prefix + tl.minimum(m0 + BLOCK_M, q_len)
        if WINDOW > 0:  # the block's first query sees nothing before its window
            kv_start = tl.maximum(prefix + m0 - WINDOW + 1, 0)
        else:
            kv_start = 0
        if USE_WHILE:  # see paged_attention_block.interpreting
            n0 = kv_start
            while n0 < kv_end:
                m_i, l_i, acc = attend_block(
                    q,
                    q_pos,
                    k_ptr,
                    v_ptr,
                    slot_row,
                    kh,
                    n0,
                    kv_end,
                    m_i,
                    l_i,
                    acc,
                    scale,
                    stride_ks,
                    stride_kh,
                    stride_vs,
                    stride_vh,
                    HEAD_DIM,
                    BLOCK_N,
                    BLOCK_D,
                    PRECISION,
                    CAUSAL=True,
                    WINDOW=WINDOW,
                    SOFTCAP=SOFTCAP,
                )
                n0 += BLOCK_N
        else:
            for n0 in range(kv_start, kv_end, BLOCK_N):
                m_i, l_i, acc = attend_block(
                    q,
                    q_pos,
                    k_ptr,
                    v_ptr,
                    slot_row,
                    kh,
                    n0,
                    kv_end,
                    m_i,
                    l_i,
                    acc,
                    scale,
                    stride_ks,
                    stride_kh,
                    stride_vs,
                    stride_vh,
                    HEAD_DIM,
                    BLOCK_N,
                    BLOCK_D,
                    PRECISION,
                    CAUSAL=True,
                    WINDOW=WINDOW,
                    SOFTCAP=SOFTCAP,
                )
        if WINDOW > 0:  # rows past q_len may see no key in their window
            l_i = tl.where(l_i > 0, l_i, 1.0)
        out = acc * (v_scale / l_i)[:, None]
        tl.store(
            o_ptr + tokens[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    prefix_lens: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of each extend sequence's new tokens over its prefix and themselves (with a
    window W, a token at position p sees positions p - W + 1 .. p; with a softcap c the scores are
    capped as c * tanh(s / c)).

    q [T, H, D] (rows q_starts[s] .. q_starts[s] + q_lens[s] - 1 are sequence s); k_cache / v_cache
    [num_slots, H_kv, D] already holding the new tokens' K/V; table [R, width] slot ids; rows,
    prefix_lens, q_starts, q_lens [S] ints; max_q_len = max(q_lens) (host int: it sizes the grid).
    K = k_cache * k_scale, V = v_cache * v_scale (the caches in q's dtype or fp8).
    Returns out [T, H, D] (rows of no sequence are left untouched).
    """
    T, H, D = q.shape
    H_kv = k_cache.shape[1]
    S = rows.shape[0]
    assert H % H_kv == 0 and k_cache.shape[2] == D and v_cache.shape == k_cache.shape
    check_kv_dtype(q, k_cache, v_cache)
    assert prefix_lens.shape == q_starts.shape == q_lens.shape == (S,)
    assert D <= 256, "head_dim up to 256"
    if q.stride(2) != 1:
        q = q.contiguous()
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and table.stride(1) == 1
    if out is None:
        out = torch.empty_like(q)
    if S == 0 or max_q_len == 0:
        return out
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if block_m is None:
        block_m = 64 if BLOCK_D <= 128 else 32
    if block_n is None:
        block_n = 64 if BLOCK_D <= 128 else 32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (S, triton.cdiv(max_q_len, block_m), H)
    _extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        table,
        rows,
        prefix_lens,
        q_starts,
        q_lens,
        float(scale) * float(k_scale),
        float(v_scale),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        table.stride(0),
        GROUP=H // H_kv,
        HEAD_DIM=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=BLOCK_D,
        PRECISION=precision,
        USE_WHILE=interpreting(),
        WINDOW=int(window or 0),
        SOFTCAP=float(softcap or 0.0),
        num_warps=4,
        num_stages=2,
    )
    return out


def extend_attention_ref(
    q,
    k_cache,
    v_cache,
    table,
    rows,
    prefix_lens,
    q_starts,
    q_lens,
    max_q_len=None,
    scale=1.0,
    k_scale=1.0,
    v_scale=1.0,
    window=None,
    softcap=None,
) -> torch.Tensor:
    """Torch reference: per sequence, gather prefix + new K/V, dequantize (x * scale), fp32 causal
    softmax (sliding-window mask and capped scores when asked)."""
    T, H, D = q.shape
    group = H // k_cache.shape[1]
    out = torch.zeros_like(q)
    for s in range(rows.shape[0]):
        prefix, start, n = int(prefix_lens[s]), int(q_starts[s]), int(q_lens[s])
        if n == 0:
            continue
        slots = table[int(rows[s]), : prefix + n].long()
        k = (k_cache[slots].float() * k_scale).repeat_interleave(group, dim=1)  # [L, H, D]
        v = (v_cache[slots].float() * v_scale).repeat_interleave(group, dim=1)
        qs = q[start : start + n].float()  # [n, H, D]
        scores = torch.einsum("nhd,lhd->hnl", qs, k) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = prefix + torch.arange(n)[:, None]
        k_pos = torch.arange(prefix + n)[None, :]
        hidden = k_pos > q_pos
        if window:
            hidden |= k_pos <= q_pos - window
        scores = scores.masked_fill(hidden[None], float("-inf"))
        out[start : start + n] = torch.einsum("hnl,lhd->nhd", torch.softmax(scores, -1), v).to(
            q.dtype
        )
    return out
