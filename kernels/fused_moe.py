"""Fused MoE: the top-k routed experts' SwiGLU MLPs as two grouped Triton GEMMs over routed tokens.

Inputs: x [T, H]; w13 [E, 2I, H] (per expert the gate rows, then the up rows, as F.linear weights);
w2 [E, H, I]; topk_weights [T, k] (float); topk_ids [T, k] (ints; an id outside [0, E), e.g. -1, is an
expert this rank does not hold: that pair contributes nothing here).

1. moe_align_block_size: the T*k (token, expert) pairs, numbered p = t*k + j, sorted by expert, each
   expert's run padded to a multiple of BLOCK_M with the sentinel T*k; expert_ids[b] is the expert of
   block b. Sizes depend only on T, k, E and BLOCK_M and nothing is read back to the host, so a CUDA
   graph can hold it; blocks past the used length (num_padded) do nothing.
2. GEMM 1, one program per (block of routed pairs, N tile): x[p // k] @ w13[e]^T -> gate_up [T*k, 2I].
3. act(gate) * up -> act [T*k, I] (rows of pairs held elsewhere: unset, never read); the activation is
   SiLU (SwiGLU, kernels/silu_mul.py) unless `activation` names another of MOE_ACTIVATIONS (torch ops).
4. GEMM 2: act[p] @ w2[e]^T * topk_weights[p] -> [T*k, H] (rows of pairs not held here stay 0).
5. Sum of each token's k rows (in float32) -> [T, H] in x.dtype.

Accumulation is float32; gate_up, act and the per-pair outputs are stored in x.dtype. fused_moe_ref is
the torch reference (a loop over the experts that received tokens); the executor runs it on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from radixserve.kernels.paged_attention_block import interpreting
from radixserve.kernels.silu_mul import silu_and_mul

# The experts' gate activation by name: SiLU (Mixtral, Qwen, DBRX), exact or tanh-approximated GELU (Grok-1).
MOE_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _act_and_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """activation(gate) * up of [.., gate | up] rows."""
    inter = gate_up.shape[-1] // 2
    return MOE_ACTIVATIONS[activation](gate_up[:, :inter]) * gate_up[:, inter:]


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    weights_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_padded_ptr,
    N,
    num_pairs,
    pairs_per_row,
    stride_am,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    K: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[p, n] = sum_k A[p // pairs_per_row, k] * B[e, n, k] (* weights[p]) for the pairs p of one block."""
    block = tl.program_id(0)
    num_padded = tl.load(num_padded_ptr)
    if block * BLOCK_M < num_padded:
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
        valid = pair < num_pairs
        row = pair // pairs_per_row
        expert = tl.load(expert_ids_ptr + block).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
        b_ptrs = (
            b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
        )
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:  # see _moe_gemm
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk
        if MUL_WEIGHT:
            acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
        tl.store(
            c_ptr + pair[:, None] * stride_cm + offs_n[None, :],
            acc.to(c_ptr.dtype.element_ty),
            mask=valid[:, None] & n_mask[None, :],
        )


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_ids [capacity] int32, expert_ids [capacity // block_m] int32, num_padded [1] int32).

    sorted_ids lists pair ids p = t*k + j grouped by expert, each group padded with the sentinel T*k up to a
    multiple of block_m; expert_ids[b] is the expert of block b (num_experts for blocks at or past
    num_padded). Pairs whose id is outside [0, num_experts) are left out.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    P = flat.numel()
    E = num_experts
    bucket = torch.where((flat >= 0) & (flat < E), flat, E)  # E: not an expert of this rank
    counts = torch.zeros(E + 1, dtype=torch.int64, device=device).scatter_add_(
        0, bucket, torch.ones_like(bucket)
    )
    padded = (counts[:E] + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    capacity = triton.cdiv(P + min(E, P) * (block_m - 1), block_m) * block_m
    order = torch.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    rank_in_expert = torch.arange(P, device=device) - (counts.cumsum(0) - counts)[sorted_bucket]
    starts = torch.cat(
        (padded_ends - padded, torch.full((1,), capacity, dtype=torch.int64, device=device))
    )
    dest = torch.where(sorted_bucket < E, starts[sorted_bucket] + rank_in_expert, capacity)
    sorted_ids = torch.full((capacity + 1,), P, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(
        torch.int32
    )  # pairs of other ranks all land in the dropped last entry
    block_starts = torch.arange(0, capacity, block_m, device=device)
    expert_ids = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    return sorted_ids[:capacity], expert_ids, padded_ends[-1:].to(torch.int32)


def _default_block_m(num_pairs: int, num_experts: int) -> int:
    per_expert = num_pairs / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def _moe_gemm(
    a, w, out, weights, sorted_ids, expert_ids, num_padded, pairs_per_row, block_m, mul_weight
):
    N, K = w.shape[1], w.shape[2]
    assert a.shape[1] == K and a.stride(1) == 1 and w.stride(2) == 1 and out.stride(1) == 1
    block_n = 64 if N >= 64 else max(16, triton.next_power_of_2(N))
    block_k = 64 if K >= 64 else max(16, triton.next_power_of_2(K))
    fp32 = a.dtype == torch.float32
    if fp32:
        block_k = min(block_k, 32)
    # The interpreter (triton 3.6) gets tl.dot of half types wrong; there the operands go up to float32,
    # which is what the GPU's half-type MMA computes (exact products, float32 sums).
    upcast = interpreting() and not fp32
    grid = (expert_ids.numel(), triton.cdiv(N, block_n))
    _moe_gemm_kernel[grid](
        a,
        w,
        out,
        weights,
        sorted_ids,
        expert_ids,
        num_padded,
        N,
        out.shape[0],
        pairs_per_row,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        K=K,
        MUL_WEIGHT=mul_weight,
        PRECISION="ieee" if fp32 else "tf32",
        UPCAST=upcast,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=2 if fp32 else 3,
    )


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    block_m: int | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * w2[e] @ (act(gate) * up)(w13[e] @ x[t]), e = topk_ids[t, j] -> [T, H]."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    assert w13.shape[2] == H and w2.shape == (E, H, two_i // 2), (x.shape, w13.shape, w2.shape)
    assert x.dtype == w13.dtype == w2.dtype and topk_weights.shape == topk_ids.shape == (T, k)
    P = T * k
    if P == 0:
        return torch.zeros_like(x)
    x = x if x.stride(1) == 1 else x.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    block_m = block_m or _default_block_m(P, E)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, E, block_m)
    gate_up = torch.empty((P, two_i), dtype=x.dtype, device=x.device)
    _moe_gemm(
        x, w13, gate_up, weights, sorted_ids, expert_ids, num_padded, k, block_m, mul_weight=False
    )
    act = silu_and_mul(gate_up) if activation == "silu" else _act_and_mul(gate_up, activation)
    per_pair = torch.zeros((P, H), dtype=x.dtype, device=x.device)
    _moe_gemm(
        act, w2, per_pair, weights, sorted_ids, expert_ids, num_padded, 1, block_m, mul_weight=True
    )
    return per_pair.view(T, k, H).sum(dim=1, dtype=torch.float32).to(x.dtype)


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Torch reference (and the CPU path): per expert that received tokens, its gated MLP on them."""
    T, k = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1).to(torch.int64)
    bucket = torch.where((flat >= 0) & (flat < E), flat, E)
    order = torch.argsort(bucket, stable=True)
    counts = torch.bincount(bucket, minlength=E + 1).tolist()
    weights = topk_weights.reshape(-1, 1).to(torch.float32)
    out = torch.zeros((T, x.shape[1]), dtype=torch.float32, device=x.device)
    start = 0
    for e in range(E):
        if counts[e]:
            pairs = order[start : start + counts[e]]
            tokens = pairs // k
            gate_up = F.linear(x[tokens], w13[e])
            y = F.linear(_act_and_mul(gate_up, activation), w2[e])
            out.index_add_(0, tokens, y.float() * weights[pairs])
            start += counts[e]
    return out.to(x.dtype)
