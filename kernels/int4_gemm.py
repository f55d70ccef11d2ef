"""Triton int4 weight-only GEMM: y = x @ W^T (+ bias) with W stored as 4-bit codes, per-group scales and
zero points (the AWQ and GPTQ checkpoint formats, repacked at load by `pack`), w = (q - z) * s.

The one layout the kernels read (`Int4Weight`; quantization/int4_linear.py converts both formats to it):
- packed int32 [N, KP / 8], KP = K rounded up to PACK (128) rows. Row n holds output feature n's codes
  along the input, in packs of 128 input rows: int32 column p * 16 + r holds rows p * 128 + 16 j + r at
  bits 4 j (j = 0..7). Unpacking nibble j of a [BLOCK_N, 16] tile gives the 16 consecutive input rows
  p * 128 + 16 j + (0..15): one shift and mask per code, and x is read in contiguous runs of 16 (no
  interleaved x gather). Rows past K hold code 0 and meet x = 0 (masked loads).
- scales [G, N] (fp16 / bf16, the checkpoint's) and zeros uint8 [G, N], group g covering input rows
  g * GROUP ... (GROUP a multiple of 16, so each run of 16 rows lies in one group; one group = KP).
- g_idx int32 [KP] or None: the group of each input row when the groups are not contiguous runs
  (GPTQ act-order under row-parallel tensor parallelism); scales and zeros are then gathered per row.
  A checkpoint whose act-order groups become contiguous once its rows are sorted is instead permuted
  at load (perm: x's columns are gathered to that order at run time, one index_select per call).

Kernels:
- `_int4_gemv_kernel` (one row of x: decode of one sequence): each program owns BLOCK_N output
  features and walks K in BLOCK_K steps, loading the whole [BLOCK_N, BLOCK_K / 8] tile of codes at
  once (BLOCK_K / 2 contiguous bytes per feature, read once, evict-first) as [BLOCK_N, packs, 16];
  (q - z) * s * x accumulates elementwise in float32 on the CUDA cores, reduced once after the loop.
- `_int4_gemv_half2_kernel` (the same for float16 / bfloat16 x, the default: `GEMV_KERNEL`): the same
  tiles, with two codes per 32-bit operation (the float16 "magic number": nibbles j and j + 4 of a word
  or-ed under 0x6400 make a half2 of 1024 + code) and half2 arithmetic per pair; float32 per word.
- `_int4_gemm_kernel` (more rows): programs own [BLOCK_M, BLOCK_N] of y; per pack and nibble the
  dequantized [BLOCK_N, 16] chunk goes to x.dtype and through tl.dot (tensor cores; x rows past M are
  masked to zeros, as in kernels/skinny_gemm.py), so every code is read once per BLOCK_M rows.
- `_dequantize_kernel`: W in x.dtype, one 128-row pack per program, for `DEQUANT_MIN_M` rows and more,
  where dequantizing once per call and cuBLAS beat the tiled kernel (the dequantization is
  O(N K), the GEMM O(M N K)).
Blocks are fixed per class of M (`config_for`), not autotuned: a served shape compiles once for each
class (the warm-up's steps cover every class) and no first call ever times configs.

References: `dequantize_reference` (torch) and `int4_gemm_reference` = F.linear on the dequantized
weight in float32, rounded once to x.dtype. The kernels accumulate in float32 too; the tensor-core path
rounds each dequantized weight to x.dtype first (bf16: ~0.4% per weight, averaging out over K).
Under the Triton interpreter (CPU tests) the dot operands go to float32 (as in skinny_gemm).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from radixserve.kernels.paged_attention_block import interpreting, num_sms

PACK = 128  # input rows per pack: 16 int32 columns of 8 nibbles
RUN = 16  # consecutive input rows per nibble position
# From this many rows of x on CUDA: dequantize to x.dtype once, then cuBLAS. H100, Llama-3-8B shapes, M=256
# (scripts/bench_int4_gemm.py): 37-236 us that way against 91-378 us for the tiled kernel.
DEQUANT_MIN_M = 32
KERNEL_DEVICES = ("cuda",)  # elsewhere the torch reference; tests add "cpu" to run the interpreter
# float16 1024.0 in both halves of a word: or-ed onto codes at bits 0-3 / 16-19 it makes the half2
# (1024 + q, 1024 + q'), or (1024 + 16 q, 1024 + 16 q') at bits 4-7 / 20-23 (the half2 GEMV).
MAGIC_FP16X2 = 0x64006400


@dataclasses.dataclass
class Int4Weight:
    """One linear layer's int4 weight in the kernels' layout (see the module docstring)."""

    packed: torch.Tensor  # int32 [N, KP / 8]
    scales: torch.Tensor  # [G, N], float
    zeros: torch.Tensor  # uint8 [G, N]
    in_features: int  # K
    group_size: int  # input rows per group (KP when the whole input is one group)
    g_idx: torch.Tensor | None = None  # int32 [KP]: per-row groups (non-contiguous groups)
    perm: torch.Tensor | None = None  # int64 [K]: x's columns in the packed rows' order

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def padded_in(self) -> int:
        return self.packed.shape[1] * 8

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.packed, self.scales, self.zeros, self.g_idx)
            if t is not None
        )


def padded(k: int) -> int:
    return -(-k // PACK) * PACK


def pack(q: torch.Tensor) -> torch.Tensor:
    """Codes q [K, N] (values 0..15, input rows first, as the checkpoints' logical layout) -> int32
    [N, KP / 8] in the kernels' layout."""
    K, N = q.shape
    kp = padded(K)
    qt = torch.zeros(N, kp, dtype=torch.int64, device=q.device)
    qt[:, :K] = q.t().to(torch.int64)
    # [N, packs, j, r] -> [N, packs, r, j]: nibble j of column (pack, r) is row pack * 128 + 16 j + r
    qt = qt.view(N, kp // PACK, 8, RUN).transpose(2, 3)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (qt << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.reshape(N, kp // 8).to(torch.int32).contiguous()


def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack: codes uint8 [K, N]."""
    N, cols = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.view(N, cols // RUN, RUN, 1) >> shifts) & 15  # [N, packs, r, j]
    rows = nibbles.transpose(2, 3).reshape(N, cols * 8)
    return rows[:, :k].t().to(torch.uint8)


def dequantize_reference(w: Int4Weight) -> torch.Tensor:
    """W [N, K] in float32, rows in the packed order (x must be permuted by w.perm first)."""
    K = w.in_features
    q = unpack(w.packed, K).float()  # [K, N]
    if w.g_idx is not None:
        groups = w.g_idx[:K].long()
    else:
        groups = torch.arange(K, device=q.device) // w.group_size
    s = w.scales.float()[groups]  # [K, N]
    z = w.zeros.float()[groups]
    return ((q - z) * s).t().contiguous()


def permute_x(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    return x if w.perm is None else x.index_select(-1, w.perm)


def int4_gemm_reference(
    x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, W, bias) in float32 on the dequantized weight, rounded once to x.dtype (also the CPU
    path: correct, not fast)."""
    b = None if bias is None else bias.float()
    return F.linear(permute_x(x, w).float(), dequantize_reference(w), b).to(x.dtype)


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _scale_zero(s_ptr, z_ptr, grp, cols, N):
    """Scales and zeros of group grp (a scalar) for features cols, as [BLOCK_N, 1] float32."""
    s = tl.load(s_ptr + grp * N + cols, eviction_policy="evict_last").to(tl.float32)
    z = tl.load(z_ptr + grp * N + cols, eviction_policy="evict_last").to(tl.float32)
    return s[:, None], z[:, None]


@triton.jit
def _scale_zero_rows(s_ptr, z_ptr, g_ptr, rows, cols, N):
    """Scales and zeros of each row's own group (g_idx) for features cols: [BLOCK_N, 16] float32."""
    grp = tl.load(g_ptr + rows)
    addr = grp[None, :] * N + cols[:, None]
    s = tl.load(s_ptr + addr, eviction_policy="evict_last").to(tl.float32)
    z = tl.load(z_ptr + addr, eviction_policy="evict_last").to(tl.float32)
    return s, z


@triton.jit
def _scale_zero_packs(s_ptr, z_ptr, grp, cols, N):
    """Scales and zeros of groups grp [NB] (one per pack) for features cols: [BLOCK_N, NB, 1]."""
    addr = grp[None, :] * N + cols[:, None]
    s = tl.load(s_ptr + addr, eviction_policy="evict_last").to(tl.float32)
    z = tl.load(z_ptr + addr, eviction_policy="evict_last").to(tl.float32)
    return s[:, :, None], z[:, :, None]


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    N,
    K: tl.constexpr,
    KP: tl.constexpr,
    GROUP: tl.constexpr,
    NGROUPS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    PER_PACK: tl.constexpr,  # one group per pack (GROUP a multiple of 128, no g_idx)
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,  # programs along K; > 1: partial sums added atomically to float32 y
):
    """y[n] = sum_k x[k] * (q[k, n] - z[g(k), n]) * s[g(k), n] (+ bias[n]) for one row of x: each step
    loads a whole [BLOCK_N, BLOCK_K / 8] tile of codes (BLOCK_K / 2 contiguous bytes per feature) as
    [BLOCK_N, NB packs, 16] and accumulates elementwise in float32, reduced once after the loop. With
    SPLIT_K > 1 program (i, s) covers the s-th of SPLIT_K equal runs of K (more programs in flight when
    N alone gives too few for the GPU's SMs)."""
    K_SPLIT: tl.constexpr = KP // SPLIT_K
    k_begin = tl.program_id(1) * K_SPLIT
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    cols = tl.minimum(offs_n, N - 1)  # past N: re-read feature N-1, dropped at the store
    NB: tl.constexpr = BLOCK_K // 128
    packs = tl.arange(0, NB)
    run = tl.arange(0, 16)
    q_ptrs = (
        q_ptr
        + cols.to(tl.int64)[:, None, None] * (KP // 8)
        + packs[None, :, None] * 16
        + run[None, None, :]
    )
    q_ptrs += k_begin // 8
    acc = tl.zeros((BLOCK_N, NB, 16), dtype=tl.float32)
    for k_step in range(0, K_SPLIT, BLOCK_K):
        k0 = k_begin + k_step
        qt = tl.load(q_ptrs, eviction_policy="evict_first")
        q_ptrs += BLOCK_K // 8
        base = k0 + packs * 128  # [NB] first row of each pack
        if PER_PACK:
            s, z = _scale_zero_packs(s_ptr, z_ptr, tl.minimum(base // GROUP, NGROUPS - 1), cols, N)
            part = tl.zeros((BLOCK_N, NB, 16), dtype=tl.float32)
        for j in tl.static_range(8):
            rows = base[:, None] + j * 16 + run[None, :]  # [NB, 16]
            if HAS_G_IDX:
                addr = tl.load(g_ptr + rows)[None, :, :] * N + cols[:, None, None]
                s = tl.load(s_ptr + addr, eviction_policy="evict_last").to(tl.float32)
                z = tl.load(z_ptr + addr, eviction_policy="evict_last").to(tl.float32)
            elif PER_PACK:
                pass  # this tile's s, z, loaded above
            else:
                grp = tl.minimum((base + j * 16) // GROUP, NGROUPS - 1)
                s, z = _scale_zero_packs(s_ptr, z_ptr, grp, cols, N)
            # Code q put in a float's mantissa under exponent 2^23 (one bit-field extract and one or,
            # instead of an int-to-float conversion at a quarter of the FMA rate): the float is
            # 2^23 + q, and minus 2^23 + z it is q - z exactly.
            bits = ((qt >> (4 * j)) & 15) | 0x4B000000
            shifted = bits.to(tl.float32, bitcast=True) - (8388608.0 + z)
            xk = tl.load(x_ptr + rows, mask=rows < K, other=0.0, eviction_policy="evict_last")
            xk = xk.to(tl.float32)[None, :, :]
            if PER_PACK:
                part += shifted * xk
            else:
                acc += shifted * s * xk
        if PER_PACK:
            acc += part * s
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + offs_n, out, mask=n_mask, sem="relaxed")


@triton.jit
def _half_pair(lo, hi):
    """[.., 16] and [.., 16] -> [.., 32] in float16, interleaved: lo[i], hi[i] adjacent (one half2)."""
    return tl.interleave(lo.to(tl.float16), hi.to(tl.float16))


@triton.jit
def _int4_gemv_half2_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    N,
    MAGIC,  # 0x64006400, as a value: in a register, the mask and the or are one LOP3
    K: tl.constexpr,
    KP: tl.constexpr,
    GROUP: tl.constexpr,
    NGROUPS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    PER_PACK: tl.constexpr,  # one group per pack (GROUP a multiple of 128, no g_idx)
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,  # programs along K; > 1: partial sums added atomically to float32 y
    LATE_SCALE: tl.constexpr,  # PER_PACK only: s applied in float32 per step, x / 16 in float16
):
    """The GEMV of `_int4_gemv_kernel` (same grid, tiles and split of K) with two codes per 32-bit
    operation. Nibbles j and j + 4 of a word (rows 16 j + r and 16 j + 64 + r of its pack) sit 16 bits
    apart, so one and + or, `(q & 0x000F000F) | 0x64006400` (MAGIC_FP16X2, passed as MAGIC so that
    ptxas makes both one LOP3), gives the half2 (1024 + q_j, 1024 + q_j+4): 0x6400 is 1024.0 in float16,
    whose 10 mantissa bits then hold the code. Nibbles 1 and 5 (3 and 7) are taken in place with mask
    0x00F000F0 (1024 + 16 q; times 1/16 exactly 64 + q), 2 and 6, 3 and 7 after one shift of the word by
    8: per word one shift and four LOP3s. Then in half2 arithmetic, per pair: minus (1024 + z) or
    (64 + z) (exact: an integer of -15..15), times s (the weight rounded once to float16, 2^-11), times
    x (converted to float16 once per step), summed over the word's four pairs and over the 4 words of
    one thread's 16-byte load (32 products summed in float16), then added to float32 once per step.
    The halves stay interleaved ([BLOCK_N, NB, 32]: word r's pair at 2 r, 2 r + 1) so that each half2
    is the word's own register (joined as [.., 2], the compiler re-pairs halves of neighbouring words
    with PRMTs). x beyond float16's range (|x| > 65504) would overflow: such x needs the float32 GEMV.
    x, scales and zeros load without the evict_last hint (its cache-policy instructions sat in the loop:
    0.15 instructions per code); the codes still stream evict_first.

    LATE_SCALE (one group per pack; "half2_late"): the products are (q - z) * x / 16 in float16, their
    per-step sum times 16 s in float32 (one multiply per 4 words instead of one per pair: 3.0 against
    3.4 instructions per code). x / 16 is exact in float16 down to |x| = 2^-10 (below, x within 2^-21);
    a float16 sum of 32 such products overflows only past |x| ~ 2000 if all 32 are at |q - z| = 15 and
    one sign (with s applied first, "half2", the bound is 65504 / (480 s), ~13,000 at s = 0.01)."""
    K_SPLIT: tl.constexpr = KP // SPLIT_K
    k_begin = tl.program_id(1) * K_SPLIT
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    cols = tl.minimum(offs_n, N - 1)  # past N: re-read feature N-1, dropped at the store
    NB: tl.constexpr = BLOCK_K // 128
    packs = tl.arange(0, NB)
    run = tl.arange(0, 16)
    q_ptrs = (
        q_ptr
        + cols.to(tl.int64)[:, None, None] * (KP // 8)
        + packs[None, :, None] * 16
        + run[None, None, :]
    )
    q_ptrs += k_begin // 8
    acc = tl.zeros((BLOCK_N, NB, 4), dtype=tl.float32)
    for k_step in range(0, K_SPLIT, BLOCK_K):
        k0 = k_begin + k_step
        qt = tl.load(q_ptrs, eviction_policy="evict_first")
        q_ptrs += BLOCK_K // 8
        base = k0 + packs * 128  # [NB] first row of each pack
        if PER_PACK:
            grp = tl.minimum(base // GROUP, NGROUPS - 1)
            addr = grp[None, :] * N + cols[:, None]
            s = tl.load(s_ptr + addr)
            z = tl.load(z_ptr + addr).to(tl.float32)
            s2 = s.to(tl.float16)[:, :, None]  # [BLOCK_N, NB, 1]
            s_late = s.to(tl.float32)[:, :, None] * 16.0
            z_even = (z + 1024.0).to(tl.float16)[:, :, None]
            z_odd = (z + 64.0).to(tl.float16)[:, :, None]
        part = tl.zeros((BLOCK_N, NB, 32), dtype=tl.float16)
        for j in tl.static_range(4):
            if j == 2:
                qt = qt >> 8
            rows = base[:, None] + j * 16 + run[None, :]  # [NB, 16]; its pair: rows + 64
            if not PER_PACK:
                if HAS_G_IDX:
                    g_lo = tl.load(g_ptr + rows)[None, :, :]
                    g_hi = tl.load(g_ptr + rows + 64)[None, :, :]
                else:  # per row too (each run of 16 lies in one group): [1, NB, 16]
                    g_lo = tl.minimum(rows // GROUP, NGROUPS - 1)[None, :, :]
                    g_hi = tl.minimum((rows + 64) // GROUP, NGROUPS - 1)[None, :, :]
                a_lo = g_lo * N + cols[:, None, None]
                a_hi = g_hi * N + cols[:, None, None]
                s2 = _half_pair(
                    tl.load(s_ptr + a_lo),
                    tl.load(s_ptr + a_hi),
                )
                z_lo = tl.load(z_ptr + a_lo).to(tl.float32)
                z_hi = tl.load(z_ptr + a_hi).to(tl.float32)
                if j % 2 == 0:
                    z_even = _half_pair(z_lo + 1024.0, z_hi + 1024.0)
                else:
                    z_odd = _half_pair(z_lo + 64.0, z_hi + 64.0)
            if j % 2 == 0:
                bits = (qt & 0x000F000F) | MAGIC
            else:
                bits = (qt & 0x00F000F0) | MAGIC
            h = tl.interleave(
                bits.to(tl.int16).to(tl.float16, bitcast=True),
                (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True),
            )  # [BLOCK_N, NB, 32]: 1024 + q (j even) or 1024 + 16 q (j odd), word r's at 2 r, 2 r + 1
            if j % 2 == 0:
                w = h - z_even
            else:
                w = h * 0.0625 - z_odd
            x_lo = tl.load(x_ptr + rows, mask=rows < K, other=0.0)
            x_hi = tl.load(x_ptr + rows + 64, mask=rows + 64 < K, other=0.0)
            if LATE_SCALE:
                x_lo, x_hi = x_lo.to(tl.float32) * 0.0625, x_hi.to(tl.float32) * 0.0625
            else:
                w = w * s2
            part += w * _half_pair(x_lo, x_hi)[None, :, :]
        # words 4 i .. 4 i + 3 (halves 8 i .. 8 i + 7, one thread's 16-byte load) summed in half2 first
        words = tl.sum(tl.reshape(part, (BLOCK_N, NB, 4, 8)), axis=3).to(tl.float32)
        if LATE_SCALE:
            acc += words * s_late
        else:
            acc += words
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(y_ptr + offs_n, out, mask=n_mask, sem="relaxed")


@triton.jit(do_not_specialize=["M"])
def _int4_gemm_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    stride_xm,
    stride_ym,
    K: tl.constexpr,
    KP: tl.constexpr,
    GROUP: tl.constexpr,
    NGROUPS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    PER_PACK: tl.constexpr,  # one group per pack (GROUP a multiple of 128, no g_idx)
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * (q[k, n] - z[g(k), n]) * s[g(k), n] (+ bias[n]) on the tensor cores:
    per pack and nibble j, a dequantized [BLOCK_N, 16] chunk in x.dtype through tl.dot."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    cols = tl.minimum(offs_n, N - 1)  # past N: re-read feature N-1, dropped at the store
    run = tl.arange(0, 16)
    q_ptrs = q_ptr + cols.to(tl.int64)[:, None] * (KP // 8) + run[None, :]
    NB: tl.constexpr = BLOCK_K // 128
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        for p in tl.static_range(NB):
            kb = k0 + p * 128
            qt = tl.load(q_ptrs + kb // 8, eviction_policy="evict_first")
            halves = (qt, qt >> 16)  # nibbles 0-3 and 4-7 in bits 0..15
            if PER_PACK:
                s, z = _scale_zero(s_ptr, z_ptr, tl.minimum(kb // GROUP, NGROUPS - 1), cols, N)
            for j in tl.static_range(8):
                rows = kb + j * 16 + run
                if HAS_G_IDX:
                    s, z = _scale_zero_rows(s_ptr, z_ptr, g_ptr, rows, cols, N)
                elif PER_PACK:
                    pass  # this pack's s, z, loaded above
                else:
                    grp = tl.minimum((kb + j * 16) // GROUP, NGROUPS - 1)
                    s, z = _scale_zero(s_ptr, z_ptr, grp, cols, N)
                place = 1 << (4 * (j % 4))  # as in the GEMV: no int-to-float conversion
                bits = (halves[j // 4] & (15 * place)) | 0x4B000000
                w = bits.to(tl.float32, bitcast=True) - (8388608.0 + z * place)
                w = w * (s * (1.0 / place))  # [BLOCK_N, 16]
                xk = tl.load(
                    x_rows + rows[None, :],
                    mask=m_mask[:, None] & (rows < K)[None, :],
                    other=0.0,
                    eviction_policy="evict_last",
                )
                if UPCAST:
                    xk = xk.to(tl.float32)
                else:
                    w = w.to(xk.dtype)
                acc = tl.dot(xk, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequantize_kernel(
    q_ptr,
    s_ptr,
    z_ptr,
    g_ptr,
    w_ptr,
    N,
    K: tl.constexpr,
    KP: tl.constexpr,
    GROUP: tl.constexpr,
    NGROUPS: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """W[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n] for one 128-row pack and BLOCK_N features."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    cols = tl.minimum(offs_n, N - 1)
    kb = tl.program_id(1) * 128
    run = tl.arange(0, 16)
    qt = tl.load(q_ptr + cols.to(tl.int64)[:, None] * (KP // 8) + kb // 8 + run[None, :])
    for j in tl.static_range(8):
        rows = kb + j * 16 + run
        if HAS_G_IDX:
            s, z = _scale_zero_rows(s_ptr, z_ptr, g_ptr, rows, cols, N)
        else:
            grp = tl.minimum((kb + j * 16) // GROUP, NGROUPS - 1)
            s, z = _scale_zero(s_ptr, z_ptr, grp, cols, N)
        w = (((qt >> (4 * j)) & 15).to(tl.float32) - z) * s
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + rows[None, :]
        tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=n_mask[:, None] & (rows < K)[None, :])


# ----------------------------------------------------------------------------------------- launch


def _config(block_m, block_n, block_k, num_warps, num_stages) -> dict:
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )


# By class of M (the rows of x): (largest M of the class, config). H100 (scripts/bench_int4_gemm.py --m 1 16
# --sweep, Llama-3-8B shapes): at M=16, BN32/BK512/4 warps took 20 / 61.8 / 71 us (qkv / down / gate_up)
# against 27 / 86 / 114 for BN16/BK512/2 warps. M == 1 (the GEMV kernel; with K split by gemv_split_k): BLOCK_N 8, so
# that even N = 4096 gives 512 programs, each loading 8 x 512 contiguous bytes of codes per step (its
# loads are not software-pipelined: the bytes in flight come from the wide tile and the programs per SM);
# M <= 16: the streaming shape on the tensor cores (cp.async pipelined num_stages deep); larger M:
# square tiles that reuse each dequantized chunk over 64 / 128 rows of x.
M_CLASSES = [
    (1, _config(1, 8, 1024, 2, 1)),
    (16, _config(16, 32, 512, 4, 3)),
    (64, _config(64, 64, 256, 4, 3)),
    (None, _config(128, 128, 128, 8, 3)),
]
DEQUANT_BLOCK_N = 64
# Under the interpreter: one pack per step (the tests' K of 128..384 then run several steps).
INTERPRET_BLOCK_K = 128


# The M == 1 kernel for float16 / bfloat16 x: "half2" (`_int4_gemv_half2_kernel`, two codes per 32-bit
# operation: 3.37 SASS instructions per code in its K loop against 7.27, tests/kernels/compile_for_hopper.py,
# not yet timed on a GPU)
# or "float32" (`_int4_gemv_kernel`, the previous one; float32 x always takes it). Both kept for
# side-by-side timing (scripts/bench_int4_gemm.py --gemv float32 half2). "half2_late": the half2 kernel
# with LATE_SCALE where one group covers each pack (2.98 instructions per code; its float16 range is
# bounded by x rather than by the weights: see the kernel), else "half2".
GEMV_KERNELS = ("half2", "half2_late", "float32")
GEMV_KERNEL = "half2"


def gemv_kernel(dtype: torch.dtype, choice: str | None = None) -> str:
    """The GEMV kernel for x of this dtype: choice (default GEMV_KERNEL) for half types, else float32."""
    choice = choice or GEMV_KERNEL
    assert choice in GEMV_KERNELS, choice
    return choice if dtype in (torch.float16, torch.bfloat16) else "float32"


# The GEMV splits K into runs until about this many programs per SM run (N alone may give few: o_proj's
# N = 4096 makes 32 programs at BLOCK_N 128); 0: never split.
GEMV_PROGRAMS_PER_SM = 4


def gemv_split_k(programs: int, kp: int, block_k: int, device: torch.device) -> int:
    """Runs of K for the GEMV: doubled while fewer than GEMV_PROGRAMS_PER_SM programs per SM would run
    and each run still holds a whole number of BLOCK_K steps."""
    split, target = 1, GEMV_PROGRAMS_PER_SM * num_sms(device)
    while programs * split < target and kp % (block_k * split * 2) == 0:
        split *= 2
    return split


def config_for(m: int) -> dict:
    for largest, config in M_CLASSES:
        if largest is None or m <= largest:
            return config
    raise AssertionError("unreachable")


def _meta(w: Int4Weight) -> dict:
    return dict(
        K=w.in_features,
        KP=w.padded_in,
        GROUP=w.group_size,
        NGROUPS=w.scales.shape[0],
        HAS_G_IDX=w.g_idx is not None,
    )


def _block_k(block_k: int, kp: int) -> int:
    """The largest of block_k, block_k / 2, ... 128 that divides the padded K."""
    while kp % block_k:
        block_k //= 2
    return block_k


def int4_gemm(
    x: torch.Tensor,
    w: Int4Weight,
    bias: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """F.linear(x, W, bias) through the tiled kernel (any M; leading dims of x flattened); y in x.dtype.
    config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages; for the GEMV also SPLIT_K and GEMV, one of
    GEMV_KERNELS) overrides the class's (benchmarks)."""
    K, N = w.in_features, w.out_features
    assert x.shape[-1] == K, (x.shape, K)
    assert bias is None or bias.shape == (N,), None if bias is None else bias.shape
    x2 = permute_x(x.reshape(-1, K), w)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*x.shape[:-1], N)
    upcast = interpreting() and x.dtype != torch.float32
    if config is None and interpreting():
        config = {**config_for(M), "BLOCK_K": INTERPRET_BLOCK_K}
    config = dict(config or config_for(M))
    config["BLOCK_K"] = _block_k(config["BLOCK_K"], w.padded_in)
    bias_arg = w.packed if bias is None else bias.contiguous()
    g_arg = w.packed if w.g_idx is None else w.g_idx
    flags = dict(
        **_meta(w),
        PER_PACK=w.g_idx is None and w.group_size % PACK == 0,
        HAS_BIAS=bias is not None,
    )
    block_m, launch = config.pop("BLOCK_M"), config
    grid = (triton.cdiv(N, launch["BLOCK_N"]), triton.cdiv(M, block_m))
    if block_m == 1:
        assert M == 1, "the GEMV config takes one row"
        choice = gemv_kernel(x.dtype, launch.pop("GEMV", None))
        kernel, extra = _int4_gemv_kernel, {}
        if choice != "float32":
            late = choice == "half2_late" and flags["PER_PACK"]
            kernel, extra = _int4_gemv_half2_kernel, dict(MAGIC=MAGIC_FP16X2, LATE_SCALE=late)
        split = launch.pop("SPLIT_K", None)
        if split is None:
            split = gemv_split_k(grid[0], w.padded_in, launch["BLOCK_K"], x.device)
        out = y if split == 1 else torch.zeros((1, N), dtype=torch.float32, device=x.device)
        kernel[(grid[0], split)](
            x2, w.packed, w.scales, w.zeros, g_arg, bias_arg, out, N, **extra, **flags,
            SPLIT_K=split, **launch,
        )  # fmt: skip
        if split > 1:
            y.copy_(out)
    else:
        _int4_gemm_kernel[grid](
            x2, w.packed, w.scales, w.zeros, g_arg, bias_arg, y, M, N, x2.stride(0), y.stride(0),
            **flags, UPCAST=upcast, BLOCK_M=block_m,
            PRECISION="ieee" if upcast or x.dtype == torch.float32 else "tf32", **launch,
        )  # fmt: skip
    return y.view(*x.shape[:-1], N)


def dequantize(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in dtype (packed row order) through the Triton kernel."""
    K, N = w.in_features, w.out_features
    out = torch.empty((N, K), dtype=dtype, device=w.packed.device)
    if N and K:
        grid = (triton.cdiv(N, DEQUANT_BLOCK_N), w.padded_in // PACK)
        _dequantize_kernel[grid](
            w.packed, w.scales, w.zeros, w.packed if w.g_idx is None else w.g_idx, out, N,
            **_meta(w), BLOCK_N=DEQUANT_BLOCK_N,
        )  # fmt: skip
    return out


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the executor's int4 linear layers call: on CUDA the tiled kernel, or from DEQUANT_MIN_M rows
    a dequantized copy and cuBLAS; elsewhere the torch reference."""
    if x.device.type not in KERNEL_DEVICES:
        return int4_gemm_reference(x, w, bias)
    rows = x.numel() // max(1, x.shape[-1])
    if rows >= DEQUANT_MIN_M:
        return F.linear(permute_x(x, w), dequantize(w, x.dtype), bias)
    return int4_gemm(x, w, bias)
