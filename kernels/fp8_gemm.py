"""fp8 (e4m3) weight GEMMs: y = x @ dequant(Wq)^T (+ bias), with Wq float8_e4m3fn [N, K] and float32 scales
that multiply to dequantize, in one of two layouts:
- rowwise: one scale per output feature, w_scale [N] (per-channel; a per-tensor scale expanded to rows);
- block: one scale per [BN, BK] tile of W, w_scale [cdiv(N, BN), cdiv(K, BK)] (DeepSeek-V3 / Qwen3-FP8).

Kernels (Triton; each with its torch reference, `*_ref`):
- `quantize_activations`: x [M, K] -> fp8 [M, K] with a float32 scale per token (rowwise) or per token and
  group of `group` columns (block: group = BK), or one given static scale. Two passes over each row
  (amax, then scale-and-round), one program per (token, group).
- `skinny_gemm_fp8` (decode, M <= 16): weight-only, like kernels/skinny_gemm.py: x stays in bf16/fp16, each
  program streams BLOCK_N rows of Wq once (1 byte a weight, read evict_first). M == 1 is a GEMV on the
  CUDA cores (weights to float32, float32 accumulation); M 2..16 a tl.dot with the operands swapped
  (y^T = W x^T: W's rows on the MMA's row side, x padded to 16 columns; weights to fp16, float32 sums).
  Rowwise scales multiply the sums once at the end; block scales multiply each K step's partial
  (BLOCK_K divides BK, so one scale per row per step).
- `scaled_gemm_fp8` (prefill, any M): x quantized by `quantize_activations`, then an fp8 x fp8 tl.dot GEMM
  (tensor cores) accumulating in float32: block scales (x's per group times W's per tile) multiply each
  K step of BLOCK_K = BK, rowwise scales (x's per token times W's per row) the sums at the end. On Hopper
  the rowwise case goes to cuBLASLt instead (`torch._scaled_mm` with rowwise scales), see `fp8_linear`.

`fp8_linear` picks one for the linear layers (services/executor/quantization/fp8.py). On the CPU (no fp8
GEMM) it dequantizes W to x's dtype and calls F.linear: correct, not fast.

Interpreter (TRITON_INTERPRET=1, CPU tests): dot operands go up to float32 (the interpreter's tl.dot of
half / fp8 types is wrong; fp8 and bf16 values are exact in float32), no autotuning, and the rounding to
fp8 is done in float32 before the cast (EXACT_ROUND), since the interpreter's float32 -> fp8 cast gets the
exponent wrong when a value rounds up to the next power of two (the GPU's cvt rounds to nearest even).

Autotuning (the skinny kernel only, keyed on the M bucket, N, K) runs at the first call of a shape, which the
executor's CUDA-graph capture and warm-up make for every decode batch size; the prefill GEMM takes fixed
blocks by M (no tuning), so only Triton's specializations compile, which the warm-up's prefill shapes cover.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from radixserve.kernels.paged_attention_block import interpreting
from radixserve.kernels.skinny_gemm import _config  # the same BLOCK_N / BLOCK_K launch configs

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
M_MAX = 16  # rows the skinny kernel takes; larger batches use the prefill GEMM
_EPS = 1e-12  # floor of a scale's amax (an all-zero row keeps a finite scale)


# -- torch: quantizing weights (load time) and the references -----------------------------------


def quantize_weight(
    w: torch.Tensor, block: tuple[int, int] | None = None, *, row_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Wq fp8 [N, K], scale float32): per output row (block None, scale [N]) or per [BN, BK] tile
    (scale [cdiv(N, BN), cdiv(K, BK)]); scale = amax / 448, so that Wq * scale ~ w. row_amax: each row's
    amax when w is a slice of longer rows (tensor parallelism)."""
    w = w.float()
    if block is None:
        amax = w.abs().amax(dim=1) if row_amax is None else row_amax.float()
        scale = amax.clamp(min=_EPS) / FP8_MAX
        return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    bn, bk = block
    N, K = w.shape
    nb, kb = triton.cdiv(N, bn), triton.cdiv(K, bk)
    padded = F.pad(w, (0, kb * bk - K, 0, nb * bn - N))
    tiles = padded.view(nb, bn, kb, bk)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=_EPS) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * bn, kb * bk)[:N, :K].contiguous(), scale


def expand_block_scale(
    scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]
) -> torch.Tensor:
    """A block scale [cdiv(N, BN), cdiv(K, BK)] as one value per element of an [N, K] weight."""
    bn, bk = block
    full = scale.repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)
    return full[: shape[0], : shape[1]]


def dequantize_weight(
    wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype
) -> torch.Tensor:
    if block is None:
        return (wq.float() * scale.float()[:, None]).to(dtype)
    return (wq.float() * expand_block_scale(scale.float(), block, wq.shape)).to(dtype)


def quantize_activations_ref(
    x: torch.Tensor, group: int | None = None, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    M, K = x.shape
    if static_scale is not None:
        scale = static_scale.float().reshape(1).expand(M).contiguous()
        return (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    g = K if group is None else group
    groups = triton.cdiv(K, g)
    padded = F.pad(x, (0, groups * g - K)).view(M, groups, g)
    scale = padded.abs().amax(dim=2).clamp(min=_EPS) / FP8_MAX
    q = (padded / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(M, -1)[:, :K]
    return q.contiguous(), (scale[:, 0].contiguous() if group is None else scale)


def skinny_gemm_fp8_ref(x, wq, w_scale, block=None, bias=None):
    """Dequantize, then matmul in float32; y in x's dtype."""
    y = x.float() @ dequantize_weight(wq, w_scale, block, torch.float32).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def scaled_gemm_fp8_ref(xq, x_scale, wq, w_scale, block=None, bias=None, out_dtype=torch.bfloat16):
    """Both operands dequantized (x per token or per token and group), matmul in float32."""
    if block is None:
        x = xq.float() * x_scale.float()[:, None]
    else:
        x = xq.float() * x_scale.float().repeat_interleave(block[1], dim=1)[:, : xq.shape[1]]
    y = x @ dequantize_weight(wq, w_scale, block, torch.float32).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# -- Triton: activation quantization ------------------------------------------------------------


@triton.jit
def _round_to_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest e4m3 value (ties to even), still in float32."""
    bits = v.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, -6)  # e4m3 subnormals: steps of 2^-9
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds to an integer, ties to even
    return ((v / step + magic) - magic) * step


@triton.jit(do_not_specialize=["M"])
def _quantize_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    static_ptr,
    M,
    stride_xm,
    K: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS: tl.constexpr,
    STATIC: tl.constexpr,
    EXACT_ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    start = g * GROUP
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, GROUP, BLOCK):
            cols = start + k0 + offs
            mask = (cols < K) & (k0 + offs < GROUP)
            v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    tl.store(s_ptr + row * GROUPS + g, scale)
    for k0 in range(0, GROUP, BLOCK):
        cols = start + k0 + offs
        mask = (cols < K) & (k0 + offs < GROUP)
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.clamp(v / scale, -448.0, 448.0)
        if EXACT_ROUND:
            v = _round_to_e4m3(v)
        tl.store(q_ptr + row * K + cols, v.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_activations(
    x: torch.Tensor, group: int | None = None, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq fp8 [M, K], scale float32): per token ([M]), per token and group of `group` columns
    ([M, cdiv(K, group)]), or the given static scale (expanded to [M])."""
    assert x.dim() == 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    group_size = K if group is None or static_scale is not None else group
    groups = triton.cdiv(K, group_size)
    q = torch.empty((M, K), dtype=FP8, device=x.device)
    scale = torch.empty((M, groups), dtype=torch.float32, device=x.device)
    if M and K:
        block = min(triton.next_power_of_2(group_size), 64 if interpreting() else 2048)
        _quantize_kernel[(M, groups)](
            x,
            q,
            scale,
            scale if static_scale is None else static_scale.float().reshape(1),
            M,
            x.stride(0),
            K=K,
            GROUP=group_size,
            GROUPS=groups,
            STATIC=static_scale is not None,
            EXACT_ROUND=interpreting(),
            BLOCK=block,
            num_warps=4,
        )
    return q, (scale[:, 0] if group is None or static_scale is not None else scale)


# -- Triton: skinny (decode) GEMMs ---------------------------------------------------------------


@triton.jit
def _gemv_fp8_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    N,
    stride_s,
    K: tl.constexpr,
    BN: tl.constexpr,  # block-scale tile rows (0: rowwise scales)
    BK: tl.constexpr,  # block-scale tile columns
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y = W x for one row x: an elementwise multiply of each [BLOCK_N, BLOCK_K] tile of W (converted
    to float32) by x's chunk into a float32 accumulator, reduced over K once after the loop."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # past N: re-read row N-1, dropped at the store
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * K + offs_k[None, :]
    if BN > 0:
        s_row = s_ptr + (rows // BN) * stride_s
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:  # no masks
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
            xk = tl.load(x_ptr + k0 + offs_k, eviction_policy="evict_last")
        else:
            k_mask = offs_k < K - k0
            w = tl.load(w_ptrs + k0, mask=k_mask[None, :], other=0.0)
            xk = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0)
        wf = w.to(tl.float32)
        if BN > 0:
            wf = wf * tl.load(s_row + k0 // BK)[:, None]
        acc2 += wf * xk.to(tl.float32)[None, :]
    acc = tl.sum(acc2, axis=1)
    if BN == 0:
        acc = acc * tl.load(s_ptr + rows)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _swapped_dot_fp8_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    stride_xm,
    stride_ym,
    stride_s,
    M_BUCKET,  # unused in the kernel: the autotuning key (next power of 2 of M)
    K: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # float32 operands (x in float32, or the interpreter)
    PRECISION: tl.constexpr,  # "ieee" for float32 operands (unused by fp16 ones)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y^T = W x^T for 2..16 rows of x on the tensor cores, operands swapped: BLOCK_N rows of W are the
    dot's row side and x's rows, padded to 16 by masked loads, its column side. Each weight is converted
    once (fp8 -> fp16, two per instruction) and the products and sums run in the MMA (wgmma on Hopper
    from BLOCK_N 64, else mma.sync); W is the operand that streams, through the software pipeline. x goes
    to fp16: exact for bf16 values of normal range up to 65504."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_m = tl.arange(0, 16)
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * K + offs_k[None, :]
    xt_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # x^T: [BLOCK_K, 16]
    if BN > 0:
        s_row = s_ptr + (rows // BN) * stride_s
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
            xt = tl.load(
                xt_ptrs + k0, mask=m_mask[None, :], other=0.0, eviction_policy="evict_last"
            )
        else:
            k_mask = offs_k < K - k0
            w = tl.load(w_ptrs + k0, mask=k_mask[None, :], other=0.0)
            xt = tl.load(xt_ptrs + k0, mask=m_mask[None, :] & k_mask[:, None], other=0.0)
        if UPCAST:
            w, xt = w.to(tl.float32), xt.to(tl.float32)
        else:
            w, xt = w.to(tl.float16), xt.to(tl.float16)
        if BN > 0:
            part = tl.dot(w, xt, input_precision=PRECISION)
            acc += part * tl.load(s_row + k0 // BK)[:, None]
        else:
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    if BN == 0:
        acc = acc * tl.load(s_ptr + rows)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])


# Starting points for Hopper, first = default without tuning. M == 1: W rows of 1 KiB per step (BLOCK_K
# 1024 fp8, as skinny_gemm's 512 bf16) for rowwise scales; block scales need BLOCK_K | BK (128).
# M 2..16 (swapped dot), on an H100's Llama-3-8B shapes (scripts/bench_fp8_gemm.py --sweep): BN32/BK256/
# 4 warps beat the other swapped configs on every shape and the unswapped dot (W as the column operand,
# through shared memory) by 1.2-1.4x: 32 layers' GEMMs at M = 8: 3.02 ms against 3.80.
GEMV_CONFIGS = [
    _config(8, 1024, 8, 4),
    _config(4, 1024, 4, 4),
    _config(16, 1024, 8, 3),
    _config(8, 512, 4, 6),
    _config(16, 512, 8, 4),
]
GEMV_BLOCK_CONFIGS = [
    _config(32, 128, 4, 6),
    _config(64, 128, 8, 4),
    _config(16, 128, 4, 8),
    _config(128, 128, 8, 4),
]
DOT_CONFIGS = [
    _config(32, 256, 4, 4),
    _config(32, 128, 4, 6),
    _config(16, 256, 4, 4),
    _config(32, 256, 4, 5),
    _config(32, 512, 4, 3),
    _config(64, 256, 4, 4),
]
DOT_BLOCK_CONFIGS = [
    _config(32, 128, 4, 6),
    _config(32, 128, 4, 4),
    _config(16, 128, 4, 6),
    _config(64, 128, 4, 4),
]
AUTOTUNE = True  # False: the first config of each list, no timing at the first call of a shape
INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _tuned(kernel, configs, key):
    return triton.autotune(configs, key=key, do_bench=_bench, cache_results=True)(kernel)


_TUNED = {  # (block scales, M > 1) -> autotuned kernel
    (False, False): _tuned(_gemv_fp8_kernel, GEMV_CONFIGS, ["N", "K", "BN", "BK"]),
    (True, False): _tuned(_gemv_fp8_kernel, GEMV_BLOCK_CONFIGS, ["N", "K", "BN", "BK"]),
    (False, True): _tuned(_swapped_dot_fp8_kernel, DOT_CONFIGS, ["M_BUCKET", "N", "K", "BN", "BK"]),
    (True, True): _tuned(
        _swapped_dot_fp8_kernel, DOT_BLOCK_CONFIGS, ["M_BUCKET", "N", "K", "BN", "BK"]
    ),
}


def skinny_gemm_fp8(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    block: tuple[int, int] | None = None,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] (at most M_MAX rows, bf16/fp16/fp32) @ dequant(wq, w_scale)^T (+ bias), in x's dtype:
    weight-only (x is not quantized). One row: the GEMV kernel; 2..16: the swapped dot. config
    (BLOCK_N, BLOCK_K, num_warps, num_stages) skips autotuning."""
    N, K = wq.shape
    assert x.shape[-1] == K and wq.dtype == FP8, (x.shape, wq.shape, wq.dtype)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > M_MAX:
        raise ValueError(f"skinny_gemm_fp8 takes at most {M_MAX} rows, got {M}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if not (M and N):
        return y.view(*x.shape[:-1], N)
    bn, bk = block or (0, 0)
    w_scale = w_scale.float().contiguous()
    bias = None if bias is None else bias.contiguous()
    dot = M > 1
    b_arg = w_scale if bias is None else bias
    s_stride = w_scale.stride(0) if block else 0
    if dot:
        kernel = _swapped_dot_fp8_kernel
        args = (x2, wq.contiguous(), w_scale, b_arg, y, M, N, x2.stride(0), y.stride(0), s_stride,
                triton.next_power_of_2(M))  # fmt: skip
        upcast = interpreting() or x.dtype == torch.float32
        meta = dict(K=K, BN=bn, BK=bk, HAS_BIAS=bias is not None, UPCAST=upcast)
        meta["PRECISION"] = "ieee" if upcast else "tf32"
    else:
        kernel = _gemv_fp8_kernel
        args = (x2, wq.contiguous(), w_scale, b_arg, y, N, s_stride)
        meta = dict(K=K, BN=bn, BK=bk, HAS_BIAS=bias is not None)
    if config is None and interpreting():
        config = dict(INTERPRET_CONFIG)
    elif config is None and not AUTOTUNE:
        c = _TUNED[(block is not None, dot)].configs[0]
        config = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    if config is not None:
        config = dict(config)
        if block is not None:
            config["BLOCK_K"] = min(config["BLOCK_K"], bk)
            assert bk % config["BLOCK_K"] == 0, (bk, config)
        kernel[(triton.cdiv(N, config["BLOCK_N"]),)](*args, **meta, **config)
    else:
        assert block is None or bk % 128 == 0, "block-scale configs step K by 128"
        tuned = _TUNED[(block is not None, dot)]
        tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **meta)
    return y.view(*x.shape[:-1], N)


def tuned_config(m: int, block: bool = False) -> triton.Config | None:
    """The config autotuning picked for the last shape run with this M (None before any), for benchmarks."""
    return getattr(_TUNED[(block, m > 1)], "best_config", None)


# -- Triton: prefill GEMM, fp8 x fp8 ------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])
def _scaled_gemm_kernel(
    a_ptr,
    as_ptr,
    w_ptr,
    ws_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    stride_ym,
    stride_as,
    stride_ws,
    K: tl.constexpr,
    BN: tl.constexpr,  # block-scale tile rows (0: rowwise)
    BLOCK_K: tl.constexpr,  # = BK for block scales
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles share their W columns in L2.
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + rows_n[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs + k0, mask=k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_mask[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        if BN > 0:
            part = tl.dot(a, tl.trans(w), input_precision=PRECISION)
            a_s = tl.load(as_ptr + rows_m * stride_as + k0 // BLOCK_K)
            w_s = tl.load(ws_ptr + (rows_n // BN) * stride_ws + k0 // BLOCK_K)
            acc += part * a_s[:, None] * w_s[None, :]
        else:
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    if BN == 0:
        acc = acc * tl.load(as_ptr + rows_m)[:, None] * tl.load(ws_ptr + rows_n)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _gemm_blocks(M: int) -> dict:
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=2, num_warps=4, num_stages=1)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)


def scaled_gemm_fp8(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    block: tuple[int, int] | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """dequant(xq, x_scale) @ dequant(wq, w_scale)^T (+ bias): rowwise (x_scale [M], w_scale [N]) or block
    (x_scale [M, cdiv(K, BK)] per token and group of BK columns, w_scale [cdiv(N, BN), cdiv(K, BK)])."""
    M, K = xq.shape
    N = wq.shape[0]
    assert wq.shape[1] == K and xq.dtype == wq.dtype == FP8
    y = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if not (M and N):
        return y
    blocks = _gemm_blocks(M)
    bn, bk = block or (0, 0)
    block_k = bk if block else (16 if interpreting() else 128)
    x_scale, w_scale = x_scale.float().contiguous(), w_scale.float().contiguous()
    grid = (triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(N, blocks["BLOCK_N"]),)
    _scaled_gemm_kernel[grid](
        xq.contiguous(),
        x_scale,
        wq.contiguous(),
        w_scale,
        w_scale if bias is None else bias.contiguous(),
        y,
        M,
        N,
        y.stride(0),
        x_scale.stride(0),
        w_scale.stride(0),
        K=K,
        BN=bn,
        BLOCK_K=block_k,
        HAS_BIAS=bias is not None,
        UPCAST=interpreting(),
        PRECISION="ieee" if interpreting() else "tf32",
        **blocks,
    )
    return y


# -- the linear layers' entry point ---------------------------------------------------------------

_rowwise_scaled_mm: bool | None = None


def _scaled_mm_rowwise_ok(device: torch.device) -> bool:
    """cuBLASLt fp8 GEMMs with rowwise scales need compute capability 9.0 (Hopper) or later."""
    global _rowwise_scaled_mm
    if _rowwise_scaled_mm is None:
        _rowwise_scaled_mm = torch.cuda.get_device_capability(device) >= (9, 0)
    return _rowwise_scaled_mm


def fp8_linear(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    block: tuple[int, int] | None = None,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, dequant(wq, w_scale), bias) in x's dtype. CUDA: the skinny kernel for <= M_MAX rows
    (weight-only: x is not quantized), else x quantized to fp8 (per token, per token and BK group, or by
    the static input_scale) and an fp8 GEMM. Elsewhere: W dequantized to x's dtype and F.linear."""
    N, K = wq.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x.device.type != "cuda":
        return F.linear(x, dequantize_weight(wq, w_scale, block, x.dtype), bias)
    if x2.shape[0] <= M_MAX:
        return skinny_gemm_fp8(x2, wq, w_scale, block, bias).view(*lead, N)
    if block is not None:
        xq, xs = quantize_activations(x2, group=block[1])
        y = scaled_gemm_fp8(xq, xs, wq, w_scale, block, bias, x.dtype)
        return y.view(*lead, N)
    xq, xs = quantize_activations(x2, static_scale=input_scale)
    if (
        _scaled_mm_rowwise_ok(x.device)
        and K % 16 == 0
        and N % 16 == 0
        and x.dtype == torch.bfloat16
    ):
        y = torch._scaled_mm(
            xq,
            wq.t(),
            scale_a=xs[:, None],
            scale_b=w_scale[None, :],
            out_dtype=x.dtype,
        )
        if bias is not None:  # added after: not every torch takes a bias with rowwise scales
            y += bias
    else:
        y = scaled_gemm_fp8(xq, xs, wq, w_scale, None, bias, x.dtype)
    return y.view(*lead, N)
