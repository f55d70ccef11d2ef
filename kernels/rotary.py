"""Triton rotary position embedding, in place on q and k, NeoX / HF rotate-half layout.

Tables as services/executor/layers/rotary.py builds them ([max_pos, head_dim] each):
  cos_table = cat(cos, cos), sin_table = cat(-sin, sin), so
  out = x * cos_table[pos] + [x2 | x1] * sin_table[pos]   (x = [x1 | x2], halves of head_dim).
Computed in float32 (table values read in their stored dtype and widened), stored in q/k's dtype.
One program per token handles all heads of q and of k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_h,
    H,
    c1,
    c2,
    s1,
    s2,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < H) & (d < HALF)
    p1 = x_ptr + h * stride_h + d
    p2 = p1 + HALF
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    o1 = x1 * c1 + x2 * s1
    o2 = x2 * c2 + x1 * s2
    tl.store(p1, o1.to(dtype), mask=mask)
    tl.store(p2, o2.to(dtype), mask=mask)


@triton.jit
def _cos_sin_of_token(
    cos_ptr,
    sin_ptr,
    pos_ptr,
    t,
    stride_cos,
    stride_sin,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Both halves of token t's cos and sin table rows, as float32 [1, BLOCK_HALF] each."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dm = d < HALF
    c1 = tl.load(cos_ptr + pos * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_sin + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_sin + HALF + d, mask=dm, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    HQ,
    HK,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c1, c2, s1, s2 = _cos_sin_of_token(
        cos_ptr, sin_ptr, pos_ptr, t, stride_cos, stride_sin, HALF, BLOCK_HALF
    )
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, HQ, c1, c2, s1, s2, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, HK, c1, c2, s1, s2, HALF, BLOCK_HK, BLOCK_HALF)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
):
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place (views with a strided token/head dim are fine,
    the last dim must be contiguous); positions [T] int index into the [max_pos, D] tables.
    Returns (q, k)."""
    T, HQ, D = q.shape
    assert k.shape[0] == T and k.shape[2] == D, (q.shape, k.shape)
    HK = k.shape[1]
    assert D % 2 == 0 and cos_table.shape[-1] == D and sin_table.shape[-1] == D
    assert q.stride(-1) == 1 and k.stride(-1) == 1, (
        "last dim of q/k must be contiguous (in-place op)"
    )
    assert cos_table.stride(-1) == 1 and sin_table.stride(-1) == 1
    assert positions.shape == (T,), (positions.shape, T)
    if T == 0:
        return q, k
    positions = positions.contiguous()
    half = D // 2
    _rotary_kernel[(T,)](
        q,
        k,
        cos_table,
        sin_table,
        positions,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_table.stride(0),
        sin_table.stride(0),
        HQ,
        HK,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(HQ),
        BLOCK_HK=triton.next_power_of_2(HK),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
    return q, k


def apply_rotary_ref(q, k, cos_table, sin_table, positions):
    """Out-of-place reference: (q_rot, k_rot), computed in float32, rounded to the input dtype."""
    cos = cos_table[positions].float().unsqueeze(1)
    sin = sin_table[positions].float().unsqueeze(1)

    def rot(x):
        half = x.shape[-1] // 2
        xf = x.float()
        return (xf * cos + torch.cat((xf[..., half:], xf[..., :half]), -1) * sin).to(x.dtype)

    return rot(q), rot(k)
