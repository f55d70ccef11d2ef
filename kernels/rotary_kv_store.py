"""Triton rotary embedding + KV-cache store in one kernel: kernels/rotary.py's rotation, then a store at the
scheduler's slots (the executor has no allocator).

For each token t (position positions[t], cache slot out_slots[t]):
  q[t]                  <- rotate(q[t])          in place, q's dtype
  k_cache[out_slots[t]] <- rotate(k[t])          rounded to k's dtype, then cast to the cache dtype
  v_cache[out_slots[t]] <- v[t]                  cast to the cache dtype
A negative slot (a CUDA-graph padding row) stores nothing; its q row is still rotated.
An fp8 cache (float8_e5m2 / float8_e4m3fn) stores rotate(k[t]) / k_scale and v[t] / v_scale (the
rotated k rounded to k's dtype first, as above), divided in float32 and saturated to the fp8 range
(+-448 for e4m3, +-57344 for e5m2) rather than overflowing to inf/NaN.
k itself is only read: the rotated k goes to the cache and nowhere else, which is all a backend
that reads K/V only from the cache (the triton one) needs.

Layouts: q [T, Hq, D], k and v [T, Hk, D] (strided token/head dims are fine, e.g. views of the fused
qkv projection output; the last dim contiguous); caches [num_slots, Hk, D]; positions and out_slots [T]
int. Rotation: NeoX / HF rotate-half with the tables of services/executor/layers/rotary.py
([max_pos, D] each, cos_table = cat(cos, cos), sin_table = cat(-sin, sin)), computed in float32,
exactly as kernels/rotary.py (its q helper is reused).

Why fused: at small batch every per-layer kernel is launch-bound (~2 us on an H100 whatever its
size); one launch per layer instead of two (rotary, then KV store) saves one launch per layer per step.
One program per token handles all q heads, k heads and v heads of that token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.kernels.paged_attention_block import FP8_KV_FORMATS, interpreting
from radixserve.kernels.rotary import _cos_sin_of_token, _rotate_heads, apply_rotary_ref


@triton.jit
def _round_to_fp8_grid(x, MANT: tl.constexpr, MIN_EXP: tl.constexpr):
    """x (float32, within the fp8 range) rounded to the nearest fp8 value, ties to even, still as
    float32. Only under the interpreter: its float-to-fp8 cast drops the carry of a round-up (7.9 ->
    4.0) and rounds ties away from zero; a value already on the grid casts exactly. The GPU's cast
    rounds correctly by itself."""
    exp = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, MIN_EXP)
    step = ((exp - MANT + 127) << 23).to(tl.float32, bitcast=True)
    units = x / step
    r = tl.floor(units + 0.5)
    odd_tie = ((r - units) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
    return tl.where(odd_tie, r - 1.0, r) * step


@triton.jit
def _to_cache(
    x,
    scale,
    out_dtype: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MANT: tl.constexpr,
    MIN_EXP: tl.constexpr,
    ROUND: tl.constexpr,
):
    """x (already rounded to its source dtype) as the cache stores it: cast, or for an fp8 cache
    x / scale saturated to +-FP8_MAX."""
    if FP8:
        y = x.to(tl.float32) / scale
        y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
        if ROUND:
            y = _round_to_fp8_grid(y, MANT, MIN_EXP)
        return y.to(out_dtype)
    else:
        return x.to(out_dtype)


@triton.jit
def _rotate_heads_into(
    x_ptr,
    stride_h,
    out_ptr,
    stride_oh,
    H,
    c1,
    c2,
    s1,
    s2,
    scale,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MANT: tl.constexpr,
    MIN_EXP: tl.constexpr,
    ROUND: tl.constexpr,
):
    """As kernels/rotary.py's _rotate_heads, but the result goes to out_ptr (rounded to x's dtype, then
    stored as _to_cache says) and x is left as it is."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < H) & (d < HALF)
    p1 = x_ptr + h * stride_h + d
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    o1 = x1 * c1 + x2 * s1
    o2 = x2 * c2 + x1 * s2
    out_dtype = out_ptr.dtype.element_ty
    o = out_ptr + h * stride_oh + d
    o1 = _to_cache(o1.to(dtype), scale, out_dtype, FP8, FP8_MAX, MANT, MIN_EXP, ROUND)
    o2 = _to_cache(o2.to(dtype), scale, out_dtype, FP8, FP8_MAX, MANT, MIN_EXP, ROUND)
    tl.store(o, o1, mask=mask)
    tl.store(o + HALF, o2, mask=mask)


@triton.jit
def _rotary_kv_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    k_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_sin,
    stride_kcs,
    stride_kch,
    stride_vcs,
    stride_vch,
    HQ,
    HK,
    D,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MANT: tl.constexpr,
    MIN_EXP: tl.constexpr,
    ROUND: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c1, c2, s1, s2 = _cos_sin_of_token(
        cos_ptr, sin_ptr, pos_ptr, t, stride_cos, stride_sin, HALF, BLOCK_HALF
    )
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, HQ, c1, c2, s1, s2, HALF, BLOCK_HQ, BLOCK_HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        _rotate_heads_into(
            k_ptr + t * stride_kt,
            stride_kh,
            kc_ptr + slot * stride_kcs,
            stride_kch,
            HK,
            c1,
            c2,
            s1,
            s2,
            k_scale,
            HALF,
            BLOCK_HK,
            BLOCK_HALF,
            FP8,
            FP8_MAX,
            MANT,
            MIN_EXP,
            ROUND,
        )
        h = tl.arange(0, BLOCK_HK)[:, None]
        dv = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HK) & (dv < D)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + dv, mask=mask)
        v = _to_cache(v, v_scale, vc_ptr.dtype.element_ty, FP8, FP8_MAX, MANT, MIN_EXP, ROUND)
        tl.store(vc_ptr + slot * stride_vcs + h * stride_vch + dv, v, mask=mask)


def rotary_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_slots: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Rotate q [T, Hq, D] in place; k_cache[s] = rotate(k), v_cache[s] = v at each slot s >= 0 of
    out_slots [T] (divided by k_scale / v_scale and saturated for an fp8 cache; the scales are
    ignored otherwise). positions [T] index the [max_pos, D] tables; k and v are not modified.
    Returns q."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    assert k.shape == (T, HK, D) and v.shape == k.shape, (q.shape, k.shape, v.shape)
    assert k_cache.shape[1:] == (HK, D) and v_cache.shape[1:] == (HK, D), (
        k_cache.shape,
        v_cache.shape,
    )
    assert D % 2 == 0 and cos_table.shape[-1] == D and sin_table.shape[-1] == D
    assert positions.shape == (T,) and out_slots.shape == (T,), (
        positions.shape,
        out_slots.shape,
        T,
    )
    assert q.stride(-1) == 1, "last dim of q must be contiguous (in-place op)"
    assert cos_table.stride(-1) == 1 and sin_table.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)
    fp8 = FP8_KV_FORMATS.get(k_cache.dtype)
    fp8_max, mant, min_exp = fp8 or (0.0, 0, 0)
    if T == 0:
        return q
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    positions, out_slots = positions.contiguous(), out_slots.contiguous()
    half = D // 2
    _rotary_kv_store_kernel[(T,)](
        q,
        k,
        v,
        cos_table,
        sin_table,
        positions,
        k_cache,
        v_cache,
        out_slots,
        float(k_scale),
        float(v_scale),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_table.stride(0),
        sin_table.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        HQ,
        HK,
        D,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(HQ),
        BLOCK_HK=triton.next_power_of_2(HK),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_D=triton.next_power_of_2(D),
        FP8=fp8 is not None,
        FP8_MAX=fp8_max,
        MANT=mant,
        MIN_EXP=min_exp,
        ROUND=fp8 is not None and interpreting(),
        num_warps=4,
    )
    return q


def to_cache_ref(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of dtype stores it: cast, or for fp8 x / scale (float32) saturated."""
    fp8 = FP8_KV_FORMATS.get(dtype)
    if fp8 is None:
        return x.to(dtype)
    return (x.float() / scale).clamp(-fp8[0], fp8[0]).to(dtype)


def store_kv_ref(k, v, k_cache, v_cache, slots, k_scale=1.0, v_scale=1.0) -> None:
    """k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t] (as to_cache_ref stores them) where
    slots[t] >= 0."""
    keep = slots >= 0
    # Byte views: CPU index_put has no fp8 kernel.
    k_cache.view(torch.uint8)[slots[keep]] = to_cache_ref(k[keep], k_scale, k_cache.dtype).view(
        torch.uint8
    )
    v_cache.view(torch.uint8)[slots[keep]] = to_cache_ref(v[keep], v_scale, v_cache.dtype).view(
        torch.uint8
    )


def rotary_and_store_kv_ref(
    q, k, v, cos_table, sin_table, positions, k_cache, v_cache, out_slots, k_scale=1.0, v_scale=1.0
) -> torch.Tensor:
    """Reference: the rotary reference, then the KV-store reference. Stores into the caches in place;
    returns the rotated q (out of place: q is not modified)."""
    q_rot, k_rot = apply_rotary_ref(q, k, cos_table, sin_table, positions)
    store_kv_ref(k_rot, v, k_cache, v_cache, out_slots, k_scale, v_scale)
    return q_rot
