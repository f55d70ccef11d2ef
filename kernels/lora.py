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

Grid: per tile of consecutive tokens, block of outputs and (shrink) chunk of K; launch_for(T) picks
the tile size and programs per tile from a few classes (Launch). The shrink splits K over programs
(partial sums added atomically to s), since its few outputs (T x R) alone give too few programs to
stream A and x at speed. A tile's tokens fall in runs of consecutive tokens of one slot; program j of
a tile takes runs j, j + P, ... and runs one tile GEMM per run on the tensor cores (tl.dot, float32
sums) over that slot's A or B with the other rows masked, into one accumulator (a row gets exact zeros
from the other runs), so y is read and written once per program; runs of base-model tokens are
skipped. A prefill's tiles are one run (one GEMM); a decode tile reads each adapter's weights once per
run, so the runner lays decode tokens out by adapter (batch_builder.py) and a tile of 16 decode tokens
on 2 adapters reads 2 adapters' weights, not 16. Decode batches up to FEW_TOKENS get a program per
possible run (P = 16: a wide grid for few tiles); larger steps one program per tile, and
prefill-sized ones (above MANY_TOKENS) tiles of 64 tokens and wider blocks, so x and y stream at
speed. A token's result does not depend on its tile-mates (masked rows are zeros). The
weights live in fixed slot buffers and the slot ids are a tensor, so the launch is the same for every mix
of adapters: CUDA graphs capture it once per batch size. In the expand, half-type inputs round s to
their dtype for the tensor cores (as PEFT computes in that dtype); float32 stays float32 (ieee).

Under the Triton interpreter (CPU tests) the dot operands go up to float32 (its half-type dot is wrong).
"""

from __future__ import annotations

import dataclasses

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
    PROGRAMS: tl.constexpr,  # programs per tile (Launch.programs)
    STATIC_RUNS: tl.constexpr,  # loop over BLOCK_T possible runs, not the tile's count (interpreter)
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """s[t, r] += the part of x[t] . A[slot, r] over this program's K_CHUNK columns, for the tokens of
    its runs of the tile (one tile GEMM per run, other rows masked, summed into one accumulator: a
    row gets nothing from other runs) and BLOCK_R of the R rank rows (s starts at zero; partial sums
    added atomically, once per program)."""
    k_begin = tl.program_id(2) * K_CHUNK
    t0 = tl.program_id(0) // PROGRAMS * BLOCK_T
    offs_t, slots, run, num_runs = _tile_runs(slots_ptr, t0, T, BLOCK_T)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt
    sub = tl.program_id(0) % PROGRAMS
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    # this program's runs: sub, sub + P, ... (the interpreter's loops take no reduced bound: every
    # possible run of the tile, those past its last one get slot -1)
    for j in range(0, BLOCK_T // PROGRAMS if STATIC_RUNS else tl.cdiv(num_runs - sub, PROGRAMS)):
        rows = run == sub + j * PROGRAMS
        slot = tl.max(tl.where(rows, slots, -1), axis=0)
        if slot >= 0:
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
    mine = (run >= 0) & (run % PROGRAMS == sub) & (slots >= 0)
    tl.atomic_add(
        s_ptr + offs_t[:, None] * R + offs_r[None, :],
        acc,
        mask=mine[:, None] & r_mask[None, :],
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
    PROGRAMS: tl.constexpr,  # programs per tile (Launch.programs)
    STATIC_RUNS: tl.constexpr,  # loop over BLOCK_T possible runs, not the tile's count (interpreter)
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y[t, n] += scale * s[t, :] . B[n, :] for the tokens of this program's runs of its tile (one
    tile GEMM per run, other rows masked, summed into one accumulator) and BLOCK_N outputs: y is read
    and written once per program."""
    t0 = tl.program_id(0) // PROGRAMS * BLOCK_T
    offs_t, slots, run, num_runs = _tile_runs(slots_ptr, t0, T, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    sub = tl.program_id(0) % PROGRAMS
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    # this program's runs: sub, sub + P, ... (the interpreter's loops take no reduced bound: every
    # possible run of the tile, those past its last one get slot -1)
    for j in range(0, BLOCK_T // PROGRAMS if STATIC_RUNS else tl.cdiv(num_runs - sub, PROGRAMS)):
        rows = run == sub + j * PROGRAMS
        slot = tl.max(tl.where(rows, slots, -1), axis=0)
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
            acc += tl.dot(s, tl.trans(b), input_precision=PRECISION) * tl.load(scales_ptr + slot)
    mine = (run >= 0) & (run % PROGRAMS == sub) & (slots >= 0)
    y_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
    mask = mine[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(-1) == 1, x.shape
    assert w.dim() == 3 and w.is_contiguous(), w.shape
    assert slots.shape == (x.shape[0],) and slots.dtype in (torch.int32, torch.int64)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How a step's tokens are cut into programs. Each distinct Launch is its own compiled kernel, so
    there are few (launch_for's classes), and the warm-up runs a step of each."""

    block_t: int  # tokens per tile (a tl.dot needs 16 rows)
    programs: int  # programs sharing a tile's runs: program j takes runs j, j + P, ...
    k_chunk: (
        int  # shrink: columns of K per program, a multiple of SHRINK_BLOCK_K (K split, atomics)
    )
    block_n: int  # expand: outputs per program (halved above a stacked rank of 64)
    num_warps: int = 4
    expand_block_t: int | None = None  # the expand's tile when not block_t


# A decode batch (few tiles, up to 16 runs each): one program per possible run, so the grid is wide.
FEW_TOKENS, FEW = 32, Launch(block_t=16, programs=16, k_chunk=256, block_n=64)
# Up to MANY_TOKENS (decode batches: tokens laid out by adapter, few runs a tile): one program per tile.
MANY_TOKENS, MANY = 256, Launch(block_t=16, programs=1, k_chunk=256, block_n=64)
# Prefill-sized steps (tiles mostly one run): large tiles, so y and x stream at speed. The expand's
# 32-token tiles: on an H100 (scripts/bench_lora_kernels.py --sweep, Llama-3-8B's shapes, rank 16)
# 32 x 128 beat 64 x 128 by up to 1.3x at 1k-8k tokens; the shrink is fastest at 64.
LARGE = Launch(block_t=64, programs=1, k_chunk=1024, block_n=128, expand_block_t=32)
SHRINK_BLOCK_K = 64


def launch_for(num_tokens: int) -> Launch:
    """The launch class of a step of num_tokens tokens (FEW, MANY or LARGE)."""
    return FEW if num_tokens <= FEW_TOKENS else MANY if num_tokens <= MANY_TOKENS else LARGE


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast the dot operands to float32, tl.dot's input_precision) for these inputs."""
    upcast = interpreting() and dtype != torch.float32  # the interpreter's half-type dot is wrong
    return upcast, "ieee" if dtype == torch.float32 or upcast else "tf32"


def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    slots: torch.Tensor,
    launch: Launch | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """s [T, R] float32: x[t] @ a[slots[t]]^T (zeros where slots[t] < 0). x [T, K], a [S, R, K].
    launch: launch_for(T) unless given (benchmarks compare others). out: zeros [T, R] float32,
    contiguous, to sum into (a view of a buffer zeroed once for many layers), else allocated."""
    _check(x, a, slots)
    T, K = x.shape
    R = a.shape[1]
    assert a.shape[2] == K and R <= MAX_STACKED_RANK and a.dtype == x.dtype, (x.shape, a.shape)
    if out is None:
        s = torch.zeros((T, R), dtype=torch.float32, device=x.device)
    else:
        assert out.shape == (T, R) and out.dtype == torch.float32 and out.is_contiguous()
        s = out
    if T:
        launch = launch or launch_for(T)
        block_r = min(max(16, triton.next_power_of_2(R)), 128)
        upcast, precision = _precision(x.dtype)
        # K split over programs (one program per tile streaming all of K ran a bs16 decode step of a
        # Llama-3-8B with 4 adapters at 212 ms on an H100)
        k_chunk = SHRINK_BLOCK_K * max(1, min(launch.k_chunk, K) // SHRINK_BLOCK_K)
        grid = (
            triton.cdiv(T, launch.block_t) * launch.programs,
            triton.cdiv(R, block_r),
            triton.cdiv(K, k_chunk),
        )
        _shrink_kernel[grid](
            x, a, slots, s, T, x.stride(0), a.stride(0), R, K,
            BLOCK_T=launch.block_t, BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K, K_CHUNK=k_chunk,
            PROGRAMS=launch.programs, STATIC_RUNS=interpreting(), UPCAST=upcast,
            PRECISION=precision, num_warps=launch.num_warps,
        )  # fmt: skip
    return s


def lora_expand(
    y: torch.Tensor,
    s: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    slots: torch.Tensor,
    launch: Launch | None = None,
) -> torch.Tensor:
    """y[t] += scales[slots[t]] * s[t] @ b[slots[t]]^T, in place (rows with slots[t] < 0 untouched).
    y [T, N], s [T, R] float32, b [S, N, R], scales [S] float32. launch: launch_for(T) unless given."""
    _check(y, b, slots)
    T, N = y.shape
    R = b.shape[2]
    assert s.shape == (T, R) and s.dtype == torch.float32 and s.is_contiguous(), s.shape
    assert b.shape[1] == N and scales.shape == (b.shape[0],), (b.shape, scales.shape)
    if T:
        launch = launch or launch_for(T)
        block_r = max(16, triton.next_power_of_2(R))
        block_t, block_n = launch.expand_block_t or launch.block_t, launch.block_n
        if block_r > 64:  # a [BLOCK_T, BLOCK_R] float32 tile of s in registers: smaller tiles
            block_t, block_n = min(block_t, 32), block_n // 2
        upcast, precision = _precision(b.dtype)
        grid = (triton.cdiv(T, block_t) * launch.programs, triton.cdiv(N, block_n))
        _expand_kernel[grid](
            s, b, scales, slots, y, T, y.stride(0), b.stride(0), N, R,
            BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n, PROGRAMS=launch.programs,
            STATIC_RUNS=interpreting(), UPCAST=upcast, PRECISION=precision,
            num_warps=launch.num_warps,
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
