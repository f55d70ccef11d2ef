"""Triton kernels for GGUF block-quantized weights on CUDA: y = x @ W^T (+ bias) straight from the blocks
(gguf_linear), and the blocks dequantized to a dense [N, K] (gguf_dequantize).

Weights: qweight is uint8 [N, K // QK * BB], the GGUF file's raw rows (gguf.GGUFReader's `tensor.data` of a
2-D weight of logical shape [N, K]): row n is K // QK blocks of BB bytes, QK elements each (ggml's layouts,
GGML_QUANT_SIZES). Types: Q8_0, Q4_0, Q4_1 (32-element blocks) and Q4_K, Q5_K, Q6_K (256-element
super-blocks). Every fp16 field sits at an even byte offset (BB is even), so the kernels read them through
an fp16 view of the same bytes.

Each block is read as PLANES "planes" of PLANE consecutive elements (elements p * PLANE .. + PLANE - 1),
each plane a run of PLANE consecutive bytes of the block that share one scale (and min), so a tile's loads
are contiguous byte runs and the scales are loaded per (row, block), not per element:
- Q8_0 {f16 d; i8 qs[32]}: 1 plane of 32, w = d * qs[l].
- Q4_0 {f16 d; u8 qs[16]}: 2 planes of 16 (low nibbles, then high), w = d * (q - 8).
- Q4_1 {f16 d, m; u8 qs[16]}: as Q4_0, w = d * q + m.
- Q4_K {f16 d, dmin; u8 scales[12]; u8 qs[128]}: 8 planes of 32 (sub-blocks); sub-block j reads the
  nibble j % 2 of qs[32 * (j // 2) + l]; 6-bit scale sc_j and min m_j packed in scales (j < 4: low 6 bits
  of bytes j and j + 4; j >= 4: a nibble of byte j + 4 plus the top 2 bits of bytes j - 4 and j);
  w = d * sc_j * q - dmin * m_j.
- Q5_K {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: as Q4_K, plus bit j of qh[l] as the 5th bit.
- Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: 16 planes of 16; element e = 128 h + r of half h
  takes nibble r // 64 of ql[64 h + r % 64] and bits 2 (r // 32) of qh[32 h + r % 32];
  w = d * scales[e // 16] * (q - 32).
Both the kernels and the test ground truth (gguf.quants.dequantize) follow these layouts. A code q becomes
a float by or-ing it into the mantissa of 2^23 (_placed) and subtracting 2^23 plus its offset, exact, as
kernels/int4_gemm.py does: per weight only integer ops, one subtract and one multiply (no int-to-float
conversion, a quarter-rate instruction on sm_90).

gguf_linear by the number of rows M of x:
- M <= M_MAX (16, decode): the skinny kernel, streaming the blocks once (~4.5-8.5 bits per weight
  instead of 16), as kernels/skinny_gemm.py does for bf16. One program per BLOCK_N output rows over all
  of K; rows past N are clamped to N - 1 (weight loads unmasked, the store masked); blocks past the row's
  end in the last K tile are clamped to its last block and their x is loaded as 0. M == 1: a multiply into
  a float32 [BLOCK_N, blocks, PLANE] accumulator per plane, reduced once after the loop. M > 1: each plane
  as a tl.dot with x's matching columns (x padded to 16 rows), the dequantized weights in x's dtype.
- M > M_MAX (prefill): gguf_dequantize to x's dtype, then cuBLAS (F.linear). At prefill sizes the GEMM is
  compute-bound and the dequantized copy costs one write + read of N * K * 2 bytes, well under the GEMM.

Tiles: BLOCK_N rows by PLANE_COLS columns of each plane, i.e. PLANE_COLS // PLANE blocks (BLOCK_K =
that many blocks' elements) per K step: a plane tile has the same shape for every type (the loads per
thread stay as wide), while the K step grows with the planes per block (Q8_0: BLOCK_K = PLANE_COLS, Q4_K:
8 * PLANE_COLS, Q6_K: 16 * PLANE_COLS). triton.autotune over GEMV_CONFIGS / DOT_CONFIGS (a list per
path and plane count) keyed on (M bucket, N, K, qtype) and the dtypes, configs whose K step exceeds the
row twice over pruned, as in skinny_gemm: tuning runs at the first call of a shape, so the executor's
eager warm-up before CUDA-graph capture must run it (TRITON_CACHE_AUTOTUNING=1 keeps the picks).
Under TRITON_INTERPRET=1 (CPU tests): 16-row tiles of two blocks per K step (INTERPRET_BLOCK_N), and the
dot operands go up to float32 (the interpreter's half-type tl.dot is wrong), as in skinny_gemm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from radixserve.kernels.paged_attention_block import interpreting
from radixserve.kernels.skinny_gemm import M_MAX

T = GGMLQuantizationType
# qtype -> (PLANE elements, f16 fields (index in 2-byte units within a block)) for the supported types
PLANES = {
    T.Q8_0: (32, (0,)),
    T.Q4_0: (16, (0,)),
    T.Q4_1: (16, (0, 1)),
    T.Q4_K: (32, (0, 1)),
    T.Q5_K: (32, (0, 1)),
    T.Q6_K: (16, (104,)),
}
SUPPORTED = tuple(PLANES)


@triton.jit
def _k_scale_min(wq_ptr, sbase, j: tl.constexpr):
    """Q4_K / Q5_K sub-block j's 6-bit scale and min (float32 [BN, NBLK]); sbase: the scales' first byte."""
    if j < 4:
        sc = tl.load(wq_ptr + sbase + j) & 63
        mn = tl.load(wq_ptr + sbase + (j + 4)) & 63
    else:
        packed = tl.load(wq_ptr + sbase + (j + 4))
        sc = (packed & 15) | ((tl.load(wq_ptr + sbase + (j - 4)) >> 6) << 4)
        mn = (packed >> 4) | ((tl.load(wq_ptr + sbase + j) >> 6) << 4)
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _placed(q):
    """2^23 + q as float32, exactly, for integers 0 <= q < 2^23: q or-ed into the mantissa of 2^23. Costs
    one integer op where an int-to-float conversion runs at a quarter of the FMA rate on sm_90."""
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _plane(
    wq_ptr, wh_ptr, byte_base, half_base, p: tl.constexpr, QTYPE: tl.constexpr, PLANE: tl.constexpr
):
    """Plane p of a [BN, NBLK] grid of blocks, dequantized: float32 [BN, NBLK, PLANE] (elements p * PLANE + l).

    byte_base / half_base [BN, NBLK]: each block's first byte, in bytes (wq_ptr, uint8) and 2-byte units
    (wh_ptr, fp16 view of the same bytes). Codes become floats through _placed: 2^23 + q, less 2^23 and
    the code's offset (both exact) is q - offset."""
    TWO23: tl.constexpr = 8388608.0
    q_at = wq_ptr + byte_base[:, :, None] + tl.arange(0, PLANE)[None, None, :]
    if QTYPE == 8:  # Q8_0: int8 codes; byte ^ 0x80 is the code + 128
        q = tl.load(q_at + 2, eviction_policy="evict_first") ^ 0x80
        d = tl.load(wh_ptr + half_base).to(tl.float32)
        w = (_placed(q) - (TWO23 + 128.0)) * d[:, :, None]
    elif QTYPE == 2:  # Q4_0
        q = (tl.load(q_at + 2, eviction_policy="evict_first") >> (4 * p)) & 15
        d = tl.load(wh_ptr + half_base).to(tl.float32)
        w = (_placed(q) - (TWO23 + 8.0)) * d[:, :, None]
    elif QTYPE == 3:  # Q4_1
        q = (tl.load(q_at + 4, eviction_policy="evict_first") >> (4 * p)) & 15
        d = tl.load(wh_ptr + half_base).to(tl.float32)
        m = tl.load(wh_ptr + half_base + 1).to(tl.float32)
        w = (_placed(q) - TWO23) * d[:, :, None] + m[:, :, None]
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K
        if QTYPE == 12:
            q = tl.load(q_at + (16 + 32 * (p // 2)), eviction_policy="evict_first")
            q = (q >> (4 * (p % 2))) & 15
        else:
            q = tl.load(q_at + (48 + 32 * (p // 2)), eviction_policy="evict_first")
            qh = tl.load(q_at + 16, eviction_policy="evict_first")
            q = ((q >> (4 * (p % 2))) & 15) | (((qh >> p) & 1) << 4)
        sc, mn = _k_scale_min(wq_ptr, byte_base + 4, p)
        d = tl.load(wh_ptr + half_base).to(tl.float32)
        dmin = tl.load(wh_ptr + half_base + 1).to(tl.float32)
        w = (_placed(q) - TWO23) * (d * sc)[:, :, None] - (dmin * mn)[:, :, None]
    else:  # Q6_K (14)
        h: tl.constexpr = p // 8
        r: tl.constexpr = p % 8  # 16-element run r of the half
        ql = tl.load(q_at + (64 * h + 16 * (r % 4)), eviction_policy="evict_first")
        qh = tl.load(q_at + (128 + 32 * h + 16 * (r % 2)), eviction_policy="evict_first")
        q = ((ql >> (4 * (r // 4))) & 15) | (((qh >> (2 * (r // 2))) & 3) << 4)
        s = tl.load(wq_ptr + byte_base + (192 + p)).to(tl.int8, bitcast=True).to(tl.float32)
        d = tl.load(wh_ptr + half_base + 104).to(tl.float32)
        w = (_placed(q) - (TWO23 + 32.0)) * (d * s)[:, :, None]
    return w


@triton.jit
def _block_bases(rows, blk, NB: tl.constexpr, BB: tl.constexpr, CLAMP: tl.constexpr):
    """[BN, NBLK] first byte of each (row, block), in bytes and in 2-byte units; blocks past NB clamped."""
    if CLAMP:
        blk = tl.minimum(blk, NB - 1)
    row_bytes: tl.constexpr = NB * BB
    byte_base = rows[:, None] * row_bytes + blk[None, :] * BB
    half_base = rows[:, None] * (row_bytes // 2) + blk[None, :] * (BB // 2)
    return byte_base, half_base


@triton.jit
def _gemm_tile(
    acc,
    x_ptr,
    wq_ptr,
    wh_ptr,
    rows,
    b0,
    offs_m,
    m_mask,
    stride_xm,
    TAIL: tl.constexpr,
    NB: tl.constexpr,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    BB: tl.constexpr,
    PLANE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NBLK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc plus this tile's products: blocks b0 .. b0 + NBLK - 1 (those past NB count as zero)."""
    blk = b0 + tl.arange(0, NBLK)
    blk_ok = blk < NB
    byte_base, half_base = _block_bases(rows, blk, NB, BB, TAIL)
    for p in tl.static_range(QK // PLANE):
        w = _plane(wq_ptr, wh_ptr, byte_base, half_base, p, QTYPE, PLANE)
        x_off = blk[:, None] * QK + p * PLANE + tl.arange(0, PLANE)[None, :]  # [NBLK, PLANE]
        if BLOCK_M == 1:
            if TAIL:
                xv = tl.load(x_ptr + x_off, mask=blk_ok[:, None], other=0.0)
            else:
                xv = tl.load(x_ptr + x_off, eviction_policy="evict_last")
            acc += w * xv.to(tl.float32)[None, :, :]
        else:
            x_at = x_ptr + offs_m[:, None, None] * stride_xm + x_off[None, :, :]
            x_ok = m_mask[:, None, None]
            if TAIL:
                x_ok = x_ok & blk_ok[None, :, None]
            xv = tl.load(x_at, mask=x_ok, other=0.0, eviction_policy="evict_last")
            x2 = tl.reshape(xv, BLOCK_M, NBLK * PLANE)
            w2 = tl.reshape(w, BLOCK_N, NBLK * PLANE)
            if UPCAST:
                x2 = x2.to(tl.float32)
            else:
                w2 = w2.to(x2.dtype)
            acc = tl.dot(x2, tl.trans(w2), acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _gguf_gemm_kernel(
    x_ptr,
    wq_ptr,
    wh_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    stride_xm,
    stride_ym,
    M_BUCKET,  # unused in the kernel: the autotuning key (next power of 2 of M)
    K: tl.constexpr,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    BB: tl.constexpr,
    PLANE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PLANE_COLS: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for this program's BLOCK_N rows n, all m < M."""
    NBLK: tl.constexpr = PLANE_COLS // PLANE
    NB: tl.constexpr = K // QK
    n_full: tl.constexpr = NB // NBLK
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # past N: re-read row N-1, dropped at the store
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, NBLK, PLANE), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, n_full):
        acc = _gemm_tile(
            acc, x_ptr, wq_ptr, wh_ptr, rows, t * NBLK, offs_m, m_mask, stride_xm, False,
            NB, QTYPE, QK, BB, PLANE, BLOCK_N, NBLK, BLOCK_M, UPCAST, PRECISION,
        )  # fmt: skip
    if n_full * NBLK < NB:
        acc = _gemm_tile(
            acc, x_ptr, wq_ptr, wh_ptr, rows, n_full * NBLK, offs_m, m_mask, stride_xm, True,
            NB, QTYPE, QK, BB, PLANE, BLOCK_N, NBLK, BLOCK_M, UPCAST, PRECISION,
        )  # fmt: skip
    if BLOCK_M == 1:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_at = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_at, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gguf_dequant_kernel(
    wq_ptr,
    wh_ptr,
    out_ptr,
    N,
    K: tl.constexpr,
    QTYPE: tl.constexpr,
    QK: tl.constexpr,
    BB: tl.constexpr,
    PLANE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PLANE_COLS: tl.constexpr,
):
    """out[n, k] = W[n, k] for this program's BLOCK_N rows and PLANE_COLS // PLANE blocks."""
    NBLK: tl.constexpr = PLANE_COLS // PLANE
    NB: tl.constexpr = K // QK
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    blk = tl.program_id(1) * NBLK + tl.arange(0, NBLK)
    byte_base, half_base = _block_bases(rows, blk, NB, BB, NB % NBLK != 0)
    out_at = (
        out_ptr
        + rows[:, None, None] * K
        + blk[None, :, None] * QK
        + tl.arange(0, PLANE)[None, None, :]
    )
    ok = n_mask[:, None, None] & (blk < NB)[None, :, None]
    for p in tl.static_range(QK // PLANE):
        w = _plane(wq_ptr, wh_ptr, byte_base, half_base, p, QTYPE, PLANE)
        tl.store(out_at + p * PLANE, w.to(out_ptr.dtype.element_ty), mask=ok)


def _config(block_n: int, plane_cols: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": block_n, "PLANE_COLS": plane_cols}, num_warps=num_warps, num_stages=num_stages
    )


# Starting points for Hopper, not yet timed on a GPU (scripts/bench_gguf_triton.py prints the picks), one
# list per path and plane count: "few" (1-2 planes per block: Q8_0, Q4_0, Q4_1) and "many" (8-16: the
# K-quants, whose unrolled plane loop holds more bytes in registers). Each thread holds
# BLOCK_N * PLANE_COLS / (32 * num_warps) elements of a plane. Every config was compiled for sm_90 here
# (no GPU, ptxas) for each type it serves at K = 4096: none spills registers (larger dot tiles did,
# by up to 6 KB per thread at 16 x 512).
# M == 1 (float32 accumulator of one plane tile, reduced after the loop; 40-177 registers).
GEMV_CONFIGS = {
    "few": [
        _config(8, 512, 8, 4),
        _config(8, 256, 4, 4),
        _config(16, 256, 8, 4),
        _config(4, 512, 4, 4),
        _config(16, 512, 8, 3),
        _config(8, 128, 4, 6),
    ],
    "many": [
        _config(8, 512, 8, 3),
        _config(8, 256, 4, 3),
        _config(16, 256, 8, 3),
        _config(4, 512, 4, 3),
        _config(8, 128, 4, 4),
        _config(16, 128, 4, 3),
    ],
}
# M > 1 (x padded to 16 rows): one tl.dot per plane, the plane tile in x's dtype.
DOT_CONFIGS = {
    "few": [
        _config(16, 128, 4, 3),
        _config(32, 128, 4, 3),
        _config(32, 256, 8, 3),
        _config(64, 128, 8, 3),
        _config(16, 64, 4, 3),
        _config(64, 64, 8, 3),
    ],
    "many": [
        _config(32, 64, 4, 2),
        _config(64, 64, 8, 2),
        _config(32, 32, 4, 3),
        _config(64, 32, 4, 2),
    ],
}
AUTOTUNE = True  # False: always the first config of the list (no tuning at the first call)
DEQUANT_CONFIG = {"BLOCK_N": 16, "PLANE_COLS": 128, "num_warps": 4, "num_stages": 1}
INTERPRET_BLOCK_N = 16  # under the interpreter: 16 rows, two blocks per K step (loop and tail)


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _prune(configs, named_args, **meta):
    """Configs whose K step (PLANE_COLS // PLANE blocks) fits in twice the row; the smallest step if none."""
    blocks = meta["K"] // meta["QK"]
    steps = {c: c.kwargs["PLANE_COLS"] // meta["PLANE"] for c in configs}
    kept = [c for c in configs if steps[c] < 2 * blocks]
    return kept or [min(configs, key=steps.get)]


_KEY = ["M_BUCKET", "N", "K", "QTYPE"]
_TUNE = dict(
    key=_KEY, do_bench=_bench, cache_results=True, prune_configs_by={"early_config_prune": _prune}
)
_TUNED = {
    (m1, planes): triton.autotune(configs[planes], **_TUNE)(_gguf_gemm_kernel)
    for m1, configs in ((True, GEMV_CONFIGS), (False, DOT_CONFIGS))
    for planes in configs
}


def plane_count(qtype: int) -> str:
    """The config family of a type: "few" planes per block (Q8_0, Q4_0, Q4_1) or "many" (K-quants)."""
    qtype = _qtype(qtype)
    return "few" if GGML_QUANT_SIZES[qtype][0] // PLANES[qtype][0] <= 2 else "many"


def configs_for(m: int, qtype: int) -> list[triton.Config]:
    """The configs autotuning picks from for M rows of x and this type."""
    return (GEMV_CONFIGS if m == 1 else DOT_CONFIGS)[plane_count(qtype)]


def tuned_config(m: int, qtype: int) -> triton.Config | None:
    """The config autotuning picked for the last shape run with this M and type's family (None before any)."""
    return getattr(_TUNED[m == 1, plane_count(qtype)], "best_config", None)


def _qtype(qtype: int) -> GGMLQuantizationType:
    qtype = GGMLQuantizationType(qtype)
    if qtype not in PLANES:
        names = ", ".join(t.name for t in SUPPORTED)
        raise ValueError(f"GGUF type {qtype.name} has no Triton kernel (supported: {names})")
    return qtype


def _layout(qweight: torch.Tensor, qtype: int) -> tuple[GGMLQuantizationType, int, int, int, int]:
    """(qtype, N, K, QK, BB) of a raw GGUF weight; raises ValueError for unsupported types or shapes."""
    qtype = _qtype(qtype)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(
            f"qweight must be uint8 [N, row bytes], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    qk, bb = GGML_QUANT_SIZES[qtype]
    n, row_bytes = qweight.shape
    if row_bytes % bb:
        raise ValueError(f"{qtype.name} rows are whole {bb}-byte blocks, got {row_bytes} bytes")
    return qtype, n, row_bytes // bb * qk, qk, bb


def _views(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes and an fp16 view of the same memory (every f16 field is 2-byte aligned)."""
    qweight = qweight.contiguous()
    return qweight, qweight.view(torch.float16)


def gguf_dequantize(qweight: torch.Tensor, qtype: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in dtype of raw GGUF rows qweight (uint8 [N, row bytes])."""
    qtype, N, K, qk, bb = _layout(qweight, qtype)
    plane = PLANES[qtype][0]
    out = torch.empty((N, K), dtype=dtype, device=qweight.device)
    if N and K:
        wq, wh = _views(qweight)
        cfg = dict(DEQUANT_CONFIG)
        if interpreting():
            cfg.update(BLOCK_N=INTERPRET_BLOCK_N, PLANE_COLS=2 * plane)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K // qk, cfg["PLANE_COLS"] // plane))
        _gguf_dequant_kernel[grid](
            wq, wh, out, N, K=K, QTYPE=int(qtype), QK=qk, BB=bb, PLANE=plane, **cfg
        )
    return out


def gguf_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qtype: int,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """F.linear(x, W, bias) for W given as raw GGUF rows (uint8 [N, row bytes] of type qtype); y in x.dtype.

    Leading dims of x are flattened. config (BLOCK_N, PLANE_COLS, num_warps, num_stages) skips autotuning.
    """
    qtype, N, K, qk, bb = _layout(qweight, qtype)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the {qtype.name} weight {K}")
    assert bias is None or (bias.shape == (N,) and bias.dtype == x.dtype), (
        None if bias is None else (bias.shape, bias.dtype)
    )
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > M_MAX:
        return F.linear(x, gguf_dequantize(qweight, qtype, x.dtype), bias)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        wq, wh = _views(qweight)
        if bias is not None:
            bias = bias.contiguous()
        fp32 = x.dtype == torch.float32
        upcast = interpreting() and not fp32
        args = (x2, wq, wh, wq if bias is None else bias, y, M, N, x2.stride(0), y.stride(0))
        meta = dict(
            K=K,
            QTYPE=int(qtype),
            QK=qk,
            BB=bb,
            PLANE=PLANES[qtype][0],
            HAS_BIAS=bias is not None,
            BLOCK_M=1 if M == 1 else 16,
            UPCAST=upcast,
            PRECISION="ieee" if fp32 or upcast else "tf32",
        )
        if config is None and interpreting():
            config = {
                "BLOCK_N": INTERPRET_BLOCK_N,
                "PLANE_COLS": 2 * PLANES[qtype][0],
                "num_warps": 4,
            }
        elif config is None and not AUTOTUNE:
            c = configs_for(M, qtype)[0]
            config = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        if config is not None:
            grid = (triton.cdiv(N, config["BLOCK_N"]),)
            _gguf_gemm_kernel[grid](*args, triton.next_power_of_2(M), **meta, **config)
        else:
            tuned = _TUNED[M == 1, plane_count(qtype)]
            tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
                *args, triton.next_power_of_2(M), **meta
            )
    return y.view(*x.shape[:-1], N)


# ---------------------------------------------------------------- references, test and benchmark data


def gguf_dequantize_ref(qweight: torch.Tensor, qtype: int) -> torch.Tensor:
    """float32 [N, K] on qweight's device, from gguf.quants.dequantize (numpy, the published layouts)."""
    from gguf.quants import dequantize

    w = dequantize(qweight.cpu().numpy(), GGMLQuantizationType(qtype))
    return torch.from_numpy(w).to(qweight.device)


def gguf_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The torch reference of gguf_linear: dequantized in float32, x @ W^T (+ bias) in float32, to x.dtype."""
    w = gguf_dequantize_ref(qweight, qtype)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w, b).to(x.dtype)


def random_qweight(
    n: int, k: int, qtype: int, *, generator: torch.Generator | None = None, device="cpu"
) -> torch.Tensor:
    """Random raw GGUF rows (uint8 [n, row bytes]) of type qtype: random bytes, with every f16 field
    (scale, min) set to a finite value of about 1e-3 (weights of magnitude < 16); for tests and benchmarks."""
    qtype = _qtype(qtype)
    qk, bb = GGML_QUANT_SIZES[qtype]
    if k % qk:
        raise ValueError(f"{qtype.name} needs K divisible by {qk}, got {k}")
    nblocks = n * (k // qk)
    raw = torch.randint(0, 256, (nblocks, bb), dtype=torch.uint8, generator=generator)
    halves = raw.view(torch.float16)
    for f in PLANES[qtype][1]:
        halves[:, f] = (torch.rand(nblocks, generator=generator) + 0.5) * 1e-3
    return raw.view(n, k // qk * bb).to(device)
