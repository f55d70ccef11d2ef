"""Triton KV-cache store: k/v [T, kv_heads, head_dim] -> caches [num_slots, kv_heads, head_dim] at slots.

`slots` are the scheduler's int64 slot ids [T] (the executor has no allocator). A negative slot
(e.g. a padded token) is skipped. Values are cast to the cache dtype on store.
One program per token; each program writes both K and V for all kv heads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcs, stride_kch, stride_vcs, stride_vch,
    H, D,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < H) & (d < D)
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(kc_ptr + slot * stride_kcs + h * stride_kch + d, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + slot * stride_vcs + h * stride_vch + d, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_cache[slots] = k; v_cache[slots] = v (in place; negative slots skipped)."""
    T, H, D = k.shape
    assert v.shape == k.shape, (v.shape, k.shape)
    assert k_cache.shape[1:] == (H, D) and v_cache.shape[1:] == (H, D), (k_cache.shape, v_cache.shape)
    assert slots.shape == (T,), (slots.shape, T)
    if T == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    slots = slots.contiguous()
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        H, D,
        BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D), num_warps=4,
    )


def store_kv_ref(k, v, k_cache, v_cache, slots) -> None:
    keep = slots >= 0
    k_cache[slots[keep]] = k[keep].to(k_cache.dtype)
    v_cache[slots[keep]] = v[keep].to(v_cache.dtype)
