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

Grid: per tile of 16 consecutive tokens, block of outputs and (shrink) chunk of K, programs_per_tile(T)
programs (SGMV-like). The shrink splits K over programs (SHRINK_K_CHUNK columns each, partial sums
added atomically to s), since its few outputs (T x R) alone give too few programs to stream A and x at
speed. A tile's tokens fall in runs of consecutive tokens of one slot; program j of a tile takes runs
j, j + P, ... and runs one tile GEMM per run on the tensor cores (tl.dot, float32 sums) over that
slot's A or B with the other rows masked; runs of base-model tokens are skipped. A prefill's tiles
are one run (one GEMM); a decode tile reads each adapter's weights once per run, so the runner lays
decode tokens out by adapter (batch_builder.py) and a tile of 16 decode tokens on 2 adapters reads 2
adapters' weights, not 16. Small steps (decode batches up to 32 tokens) get a program per possible
run (P = 16: a wide grid for few tiles); larger ones one program per tile (P = 1: no programs that
exit at once, which at prefill sizes were most of the launch). A token's result does not depend on its tile-mates (masked rows are zeros). The
weights live in fixed slot buffers and the slot ids are a tensor, so the launch is the same for every mix
of adapters: CUDA graphs capture it once per batch size. In the expand, half-type inputs round s to
their dtype for the tensor cores (as PEFT computes in that dtype); float32 stays float32 (ieee).

Under the Triton interpreter (CPU tests) the dot operands go up to float32 (its half-type dot is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.kernels.paged_attention_block import interpreting

MAX_STACKED_RANK = 256  # R: up to 3 shards (q/k/v) of rank 64, padded to a power of two


@triton.jit
def _tile_runs(slots_ptr, t0, T, BLOCK_T: tl.constexpr):
    """The tile's tokens, their slots, each one's run number (a run: consecutive tokens of one slot)
    and the tile's number of runs."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    slots = tl.load(slots_ptr + offs_t, mask=t_mask, other=-1)
    prev = tl.load(slots_ptr + offs_t - 1, mask=t_mask & (offs_t > t0), other=-1)
    starts = ((offs_t == t0) | (slots != prev)) & t_mask
    run = tl.where(t_mask, tl.cumsum(starts.to(tl.int32), axis=0) - 1, -1)
    return offs_t, slots, run, tl.max(run, axis=0) + 1


@triton.jit(do_not_specialize=["T"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    slots_ptr,
    s_ptr,
    T,
    stride_xt,
    stride_as,
    R: tl.constexpr,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_CHUNK: tl.constexpr,  # columns of x (and A) per program: K is split over programs
    PROGRAMS: tl.constexpr,  # programs per tile (programs_per_tile)
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """s[t, r] += the part of x[t] . A[slot, r] over this program's K_CHUNK columns, for the tokens of
    its run of the tile (one tile GEMM, other rows masked) and BLOCK_R of the R rank rows (s starts at
    zero; partial sums added atomically)."""
    k_begin = tl.program_id(2) * K_CHUNK
    t0 = tl.program_id(0) // PROGRAMS * BLOCK_T
    offs_t, slots, run, num_runs = _tile_runs(slots_ptr, t0, T, BLOCK_T)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt
    sub = tl.program_id(0) % PROGRAMS
    for i in range(0, BLOCK_T // PROGRAMS):  # runs sub, sub + P, ... (at most BLOCK_T in a tile)
        rows = run == sub + i * PROGRAMS
        slot = tl.max(tl.where(rows, slots, -1), axis=0)  # -1 past the tile's last run too
        if slot >= 0:
            acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None].to(tl.int64) * K
            for kk in range(0, K_CHUNK, BLOCK_K):
                k0 = k_begin + kk
                k_mask = k0 + offs_k < K
                xk = tl.load(
                    x_rows + k0 + offs_k[None, :], mask=rows[:, None] & k_mask[None, :], other=0.0
                )
                a = tl.load(
                    a_rows + k0 + offs_k[None, :],
                    mask=r_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if UPCAST:
                    xk, a = xk.to(tl.float32), a.to(tl.float32)
                acc = tl.dot(xk, tl.trans(a), acc, input_precision=PRECISION)
            tl.atomic_add(
                s_ptr + offs_t[:, None] * R + offs_r[None, :],
                acc,
                mask=rows[:, None] & r_mask[None, :],
                sem="relaxed",
            )


@triton.jit(do_not_specialize=["T"])
def _expand_kernel(
    s_ptr,
    b_ptr,
    scales_ptr,
    slots_ptr,
    y_ptr,
    T,
    stride_yt,
    stride_bs,
    N,
    R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PROGRAMS: tl.constexpr,  # programs per tile (programs_per_tile)
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y[t, n] += scale * s[t, :] . B[n, :] for the tokens of this program's run of its tile (one
    tile GEMM, other rows masked) and BLOCK_N outputs."""
    t0 = tl.program_id(0) // PROGRAMS * BLOCK_T
    offs_t, slots, run, num_runs = _tile_runs(slots_ptr, t0, T, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    sub = tl.program_id(0) % PROGRAMS
    for i in range(0, BLOCK_T // PROGRAMS):  # runs sub, sub + P, ... (at most BLOCK_T in a tile)
        rows = run == sub + i * PROGRAMS
        slot = tl.max(tl.where(rows, slots, -1), axis=0)  # -1 past the tile's last run too
        if slot >= 0:
            s = tl.load(
                s_ptr + offs_t[:, None] * R + offs_r[None, :],
                mask=rows[:, None] & r_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr
                + slot.to(tl.int64) * stride_bs
                + offs_n[:, None].to(tl.int64) * R
                + offs_r[None, :],
                mask=n_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                b = b.to(tl.float32)
            else:
                s = s.to(b.dtype)  # half types: the tensor cores (float32 sums); float32: ieee
            delta = tl.dot(s, tl.trans(b), input_precision=PRECISION) * tl.load(scales_ptr + slot)
            y_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
            mask = rows[:, None] & n_mask[None, :]
            y = tl.load(y_ptrs, mask=mask, other=0.0)
            tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(-1) == 1, x.shape
    assert w.dim() == 3 and w.is_contiguous(), w.shape
    assert slots.shape == (x.shape[0],) and slots.dtype in (torch.int32, torch.int64)


BLOCK_T = 16  # tokens per program: a tl.dot needs 16 rows
FEW_TOKENS = 2 * BLOCK_T  # at most this many tokens: a program per run of a tile


def programs_per_tile(num_tokens: int) -> int:
    """Programs sharing a tile's runs (program j takes runs j, j + P, ...). A small step (a decode
    batch: few tiles, up to 16 runs each) gets one program per run, so its grid is wide; a large
    one (prefill tiles are one run; decode tokens are laid out by adapter, so few runs) one per
    tile, not 15 programs that exit at once per tile."""
    return BLOCK_T if num_tokens <= FEW_TOKENS else 1


SHRINK_K_CHUNK = 256  # columns of K per shrink program


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast the dot operands to float32, tl.dot's input_precision) for these inputs."""
    upcast = interpreting() and dtype != torch.float32  # the interpreter's half-type dot is wrong
    return upcast, "ieee" if dtype == torch.float32 or upcast else "tf32"


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """s [T, R] float32: x[t] @ a[slots[t]]^T (zeros where slots[t] < 0). x [T, K], a [S, R, K]."""
    _check(x, a, slots)
    T, K = x.shape
    R = a.shape[1]
    assert a.shape[2] == K and R <= MAX_STACKED_RANK and a.dtype == x.dtype, (x.shape, a.shape)
    s = torch.zeros((T, R), dtype=torch.float32, device=x.device)
    if T:
        block_r = min(max(16, triton.next_power_of_2(R)), 128)
        upcast, precision = _precision(x.dtype)
        block_k = 64
        # K split over programs (one program per tile streaming all of K ran a bs16 decode step of a
        # Llama-3-8B with 4 adapters at 212 ms on an H100): about SHRINK_K_CHUNK columns each
        k_chunk = block_k * max(1, min(SHRINK_K_CHUNK, K) // block_k)
        programs = programs_per_tile(T)
        grid = (
            triton.cdiv(T, BLOCK_T) * programs,
            triton.cdiv(R, block_r),
            triton.cdiv(K, k_chunk),
        )
        _shrink_kernel[grid](
            x, a, slots, s, T, x.stride(0), a.stride(0), R, K,
            BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_K=block_k, K_CHUNK=k_chunk, PROGRAMS=programs,
            UPCAST=upcast,
            PRECISION=precision,
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
        block_r = max(16, triton.next_power_of_2(R))
        block_n = 64 if block_r <= 64 else 32
        upcast, precision = _precision(b.dtype)
        programs = programs_per_tile(T)
        _expand_kernel[(triton.cdiv(T, BLOCK_T) * programs, triton.cdiv(N, block_n))](
            s, b, scales, slots, y, T, y.stride(0), b.stride(0), N, R,
            BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_N=block_n, PROGRAMS=programs, UPCAST=upcast,
            PRECISION=precision,
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
