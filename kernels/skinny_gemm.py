"""Triton skinny GEMM for small-batch decode: y = x @ W^T (+ bias), x [M, K] with M <= M_MAX (16).

Layout: W [N, K] row-major (torch Linear weight), contiguous; x [M, K] with a contiguous last dim (any
row stride; leading dims are flattened); bias [N] or None; y [M, N] contiguous in x.dtype. bf16 / fp16
(and fp32) inputs, float32 accumulation, bias added in float32, one rounding to x.dtype at the store.

At M <= 16 a Linear is a pass over W: the kernel is built to stream W at memory bandwidth.
- Each program owns BLOCK_N output features and loops over all of K (no split-K: no partial sums in
  global memory, no separate reduction kernel). Grid: cdiv(N, BLOCK_N); BLOCK_N 4..64, so even N = 4096
  gives 64..1024 programs for the 132 SMs of an H100 (the fastest configs there: 256..512).
- W is read in [BLOCK_N, BLOCK_K] tiles, each row a contiguous run of K (coalesced, 16-byte loads),
  marked evict_first (read once); the K loop is software-pipelined num_stages deep. x's [M, BLOCK_K]
  chunk is re-read by every program but stays in L2 / L1.
- Rows of W past N are clamped to row N-1, so the W loads need no mask; only the store is masked.
  K is a compile-time constant: the loop runs K // BLOCK_K unmasked iterations plus one masked tail
  when BLOCK_K does not divide K.
- M == 1 (BLOCK_M = 1): a GEMV on the CUDA cores, an elementwise multiply of the W tile by the x chunk
  into a float32 [BLOCK_N, BLOCK_K] accumulator, reduced over K once (tl.sum) after the loop.
- M > 1 (BLOCK_M = 16): tl.dot on the tensor cores with x padded to 16 rows by masked loads (mma.sync
  16xNx16; the padding is free, the MMA work is far under the time to read W). A broadcast multiply-sum on the
  CUDA cores would cost M * N * K FMAs (16 * 4096 * 4096 FMAs are about as long as reading W), so
  tensor cores for all M > 1.

Block sizes come from triton.autotune over 6 configs per path (GEMV_CONFIGS, DOT_CONFIGS), keyed on
(M bucket = next power of 2 of M, N, K) and the dtypes; timed with triton.testing.do_bench (L2 flushed
between runs, as in decode, where the weights of a step do not fit in L2). Autotuning runs on the
first call of a shape and must not happen inside CUDA-graph capture: the executor
(services/executor/cuda_graph_runner.py) runs every batch size twice eagerly on a side stream before
capturing it, which tunes every shape. Set TRITON_CACHE_AUTOTUNING=1 to keep the choices on disk across
restarts, or AUTOTUNE = False to skip tuning (first config of each list). Results depend on the chosen
BLOCK_K only through the float32 summation order.

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tests) there is no autotuning (INTERPRET_CONFIG or
the caller's config), and the dot operands go up to float32, since the interpreter's tl.dot of half
types is wrong (same as kernels/fused_moe.py); the GPU's half-type MMA computes exact products with
float32 sums, so the numerics match.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.kernels.paged_attention_block import interpreting

M_MAX = 16  # largest M (rows of x) the kernel takes; larger batches belong to cuBLAS


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _skinny_gemm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    stride_xm,
    stride_ym,
    M_BUCKET,  # unused in the kernel: the autotuning key (next power of 2 of M)
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for this program's BLOCK_N features n, all m < M."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # past N: re-read row N-1, dropped at the store
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * K + offs_k[None, :]
    k_main: tl.constexpr = K // BLOCK_K * BLOCK_K  # the unmasked part of the K loop
    if BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, k_main, BLOCK_K):
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
            xk = tl.load(x_ptr + k0 + offs_k, eviction_policy="evict_last")
            acc2 += w.to(tl.float32) * xk.to(tl.float32)[None, :]
        if k_main < K:
            k_mask = offs_k < K - k_main
            w = tl.load(w_ptrs + k_main, mask=k_mask[None, :], other=0.0)
            xk = tl.load(x_ptr + k_main + offs_k, mask=k_mask, other=0.0)
            acc2 += w.to(tl.float32) * xk.to(tl.float32)[None, :]
        acc = tl.sum(acc2, axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_main, BLOCK_K):
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
            # padding rows masked to zeros: clamping them to row M-1 (copies of one address) ran up to 1.5x slower
            xk = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0, eviction_policy="evict_last")
            if UPCAST:
                w, xk = w.to(tl.float32), xk.to(tl.float32)
            acc = tl.dot(xk, tl.trans(w), acc, input_precision=PRECISION)
        if k_main < K:
            k_mask = offs_k < K - k_main
            w = tl.load(w_ptrs + k_main, mask=k_mask[None, :], other=0.0)
            xk = tl.load(x_ptrs + k_main, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                w, xk = w.to(tl.float32), xk.to(tl.float32)
            acc = tl.dot(xk, tl.trans(w), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _config(block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=num_warps, num_stages=num_stages
    )


# Each list best first: on an H100 (Llama-3-8B bf16 shapes, M = 1..16) the first config of each list came
# within ~2% of the best of 13 (GEMV) and 17 (dot) configs timed on every shape (scripts/bench_skinny_gemm.py
# --sweep); the others win by a percent or two on some shapes.
# M == 1. Per thread the float32 accumulator holds BLOCK_N * BLOCK_K / (32 * num_warps) values (16..64).
GEMV_CONFIGS = [
    _config(8, 512, 8, 4),
    _config(4, 512, 4, 4),
    _config(8, 1024, 8, 3),
    _config(16, 1024, 8, 3),
    _config(8, 256, 4, 6),
    _config(8, 512, 4, 4),
]
# M > 1 (x padded to 16 rows). Shared memory per stage: (BLOCK_N + 16) * BLOCK_K * 2 bytes.
DOT_CONFIGS = [
    _config(16, 512, 2, 3),
    _config(16, 256, 2, 4),
    _config(16, 256, 2, 6),
    _config(32, 256, 4, 4),
    _config(32, 512, 4, 3),
    _config(64, 256, 4, 3),
]
AUTOTUNE = (
    True  # False: always the first config of the list (deterministic, no tuning at the first call)
)
# Under the interpreter: small blocks, so that the tests' K (64, 200) run both the loop and the tail.
INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_KEY = ["M_BUCKET", "N", "K"]
# cache_results: each shape's pick is kept in Triton's cache folder (the executor points TRITON_CACHE_DIR at
# radixserve's cache), so a restart reads it instead of timing the configs again.
_gemv_tuned = triton.autotune(GEMV_CONFIGS, key=_KEY, do_bench=_bench, cache_results=True)(
    _skinny_gemm_kernel
)
_dot_tuned = triton.autotune(DOT_CONFIGS, key=_KEY, do_bench=_bench, cache_results=True)(
    _skinny_gemm_kernel
)


def tuned_config(m: int) -> triton.Config | None:
    """The config autotuning picked for the last shape run with this M (None before any), for benchmarks."""
    return getattr(_gemv_tuned if m == 1 else _dot_tuned, "best_config", None)


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) for at most M_MAX rows of x (leading dims flattened); y in x.dtype.

    config (BLOCK_N, BLOCK_K, num_warps, num_stages) skips autotuning, e.g. to time one config.
    """
    N, K = weight.shape
    assert x.shape[-1] == K, (x.shape, weight.shape)
    assert x.dtype == weight.dtype, (x.dtype, weight.dtype)
    assert bias is None or (bias.shape == (N,) and bias.dtype == x.dtype), (
        None if bias is None else bias.shape
    )
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > M_MAX:
        raise ValueError(f"skinny_gemm takes at most {M_MAX} rows, got {M}")
    weight = weight.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        if bias is not None:
            bias = bias.contiguous()
        fp32 = x.dtype == torch.float32
        upcast = interpreting() and not fp32
        block_m = 1 if M == 1 else 16
        args = (
            x2,
            weight,
            weight if bias is None else bias,
            y,
            M,
            N,
            x2.stride(0),
            y.stride(0),
            triton.next_power_of_2(M),
        )
        meta = dict(
            K=K,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            UPCAST=upcast,
            PRECISION="ieee" if fp32 or upcast else "tf32",
        )
        if config is None and interpreting():
            config = INTERPRET_CONFIG
        elif config is None and not AUTOTUNE:
            c = (GEMV_CONFIGS if M == 1 else DOT_CONFIGS)[0]
            config = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        if config is not None:
            grid = (triton.cdiv(N, config["BLOCK_N"]),)
            _skinny_gemm_kernel[grid](*args, **meta, **config)
        else:
            tuned = _gemv_tuned if M == 1 else _dot_tuned
            tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **meta)
    return y.view(*x.shape[:-1], N)
