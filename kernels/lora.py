"""Batched multi-LoRA GEMMs: every token of a step uses its own adapter's weights (or none).

A LoRA target adds scale * (x @ A^T) @ B^T to the base layer's output. With many adapters in one batch,
each token t carries the GPU slot of its request's adapter (slots[t]; -1: the base model, nothing
added), and the two GEMMs gather that slot's A and B (the "BGMV" form of Punica / S-LoRA: a gathered
matrix-vector product per token):

- shrink: s[t, :] = x[t, :] @ A[slots[t]]^T         A: [num_slots, R, K] -> s: [T, R] float32
- expand: y[t, :] += scale[slots[t]] * s[t, :] @ B[slots[t]]^T   B: [num_slots, N, R], y: [T, N] in place

R is the stacked rank of a fused layer: q/k/v (or gate/up) each have their rank-r A stacked into R =
shards * r rows, and B is block-diagonal [N, R] (shard i's output rows read only its r columns), so one
shrink and one expand serve the fused GEMM. s stays float32 between the two (no rounding of the small
intermediate), and is what a row-parallel layer all-reduces between them.

Grid: one program per (token, block of outputs); a program whose token has slot -1 stores zeros (shrink)
or returns at once (expand), so base-model tokens cost a load of their slot id. The weights live in fixed
slot buffers, and the slot ids are a tensor, so the launch is the same for every mix of adapters: CUDA
graphs capture it once per batch size. Tokens of one request share their adapter, so the per-token
re-reads of A and B hit L2 (A and B of one slot and target are R * (K + N) elements).

Under the Triton interpreter (CPU tests) everything is computed in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_STACKED_RANK = 256  # R: up to 3 shards (q/k/v) of rank 64, padded to a power of two


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    slots_ptr,
    s_ptr,
    stride_xt,
    stride_as,
    R,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        tl.store(s_ptr + t * R + offs_r, tl.zeros((BLOCK_R,), dtype=tl.float32), mask=r_mask)
        return
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None].to(tl.int64) * K
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xk = tl.load(x_ptr + t.to(tl.int64) * stride_xt + offs_k, mask=k_mask, other=0.0)
        a = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += a.to(tl.float32) * xk.to(tl.float32)[None, :]
    tl.store(s_ptr + t * R + offs_r, tl.sum(acc, axis=1), mask=r_mask)


@triton.jit
def _expand_kernel(
    s_ptr,
    b_ptr,
    scales_ptr,
    slots_ptr,
    y_ptr,
    stride_yt,
    stride_bs,
    R,
    N,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    s = tl.load(s_ptr + t * R + offs_r, mask=r_mask, other=0.0)
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None].to(tl.int64) * R + offs_r[None, :],
        mask=n_mask[:, None] & r_mask[None, :],
        other=0.0,
    )
    delta = tl.sum(b.to(tl.float32) * s[None, :], axis=1) * tl.load(scales_ptr + slot)
    y_ptrs = y_ptr + t.to(tl.int64) * stride_yt + offs_n
    y = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=n_mask)


def _check(x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(-1) == 1, x.shape
    assert w.dim() == 3 and w.is_contiguous(), w.shape
    assert slots.shape == (x.shape[0],) and slots.dtype in (torch.int32, torch.int64)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """s [T, R] float32: x[t] @ a[slots[t]]^T (zeros where slots[t] < 0). x [T, K], a [S, R, K]."""
    _check(x, a, slots)
    T, K = x.shape
    R = a.shape[1]
    assert a.shape[2] == K and R <= MAX_STACKED_RANK, (x.shape, a.shape)
    s = torch.empty((T, R), dtype=torch.float32, device=x.device)
    if T:
        _shrink_kernel[(T,)](
            x, a, slots, s, x.stride(0), a.stride(0), R, K,
            BLOCK_R=triton.next_power_of_2(R), BLOCK_K=64,
        )  # fmt: skip
    return s


def lora_expand(
    y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """y[t] += scales[slots[t]] * s[t] @ b[slots[t]]^T, in place (rows with slots[t] < 0 untouched).
    y [T, N], s [T, R] float32, b [S, N, R], scales [S] float32."""
    _check(y, b, slots)
    T, N = y.shape
    R = b.shape[2]
    assert s.shape == (T, R) and s.dtype == torch.float32 and s.is_contiguous(), s.shape
    assert b.shape[1] == N and scales.shape == (b.shape[0],), (b.shape, scales.shape)
    if T:
        block_n = 64
        _expand_kernel[(T, triton.cdiv(N, block_n))](
            s, b, scales, slots, y, y.stride(0), b.stride(0), R, N,
            BLOCK_R=triton.next_power_of_2(R), BLOCK_N=block_n,
        )  # fmt: skip
    return y


def shrink_reference(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """lora_shrink in plain torch (float32): one GEMM per distinct slot of the batch (host sync)."""
    s = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    for slot in slots.unique().tolist():
        if slot >= 0:
            rows = (slots == slot).nonzero().squeeze(1)
            s[rows] = x[rows].float() @ a[slot].float().T
    return s


def expand_reference(
    y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """lora_expand in plain torch: y += the delta (rounded once to y's dtype), in place."""
    for slot in slots.unique().tolist():
        if slot >= 0:
            rows = (slots == slot).nonzero().squeeze(1)
            delta = (s[rows] @ b[slot].float().T) * scales[slot]
            y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y


def lora_reference(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """The delta shrink + expand add to y ([T, N] float32), in plain torch: the reference of the
    kernels (the executor's `--lora-backend torch` runs shrink_reference and expand_reference)."""
    y = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32, device=x.device)
    return expand_reference(y, shrink_reference(x, a, slots), b, scales, slots)
