"""Paged decode attention (one query token per sequence) with GQA and split-KV, in Triton.

Flash-decoding style, two stages:

* Stage 1, grid (B, num_kv_heads, num_splits): one program takes every query head of one kv-head group
  (GQA: G = num_heads // num_kv_heads rows, padded to BLOCK_H = max(16, next_pow2(G)) so that tl.dot can
  be used) and one contiguous split of the sequence's positions. It walks the split in blocks of BLOCK_N
  tokens, gathers the K/V rows through the slot table (page size 1: one slot per token) and keeps an
  online softmax in float32. It writes an fp32 partial output [B, H, S, D] (already normalised by its own
  softmax sum) and the log-sum-exp [B, H, S] of the scaled scores (-inf for a split with no token).
* Stage 2, grid (B, num_heads): merges the splits with weights exp(lse_s - max_s lse_s). A sequence whose
  splits are all empty (seq_len 0) gets zeros.

Each sequence is split on its own length: split_len = ceil(seq_len / num_splits) rounded up to a whole
BLOCK_N, so a short sequence uses fewer splits, and nothing depends on the table's width. That keeps the
launch shape a function of (B, num_splits) alone, which CUDA graphs need. Table entries past seq_len are
never loaded. The table row of sequence b is rows[b] when rows is given (a persistent
request-to-slot table, as the executor keeps), else b.

An fp8 KV cache (k_cache / v_cache in float8_e5m2 or float8_e4m3fn holding k / k_scale and
v / v_scale) is read in q's dtype: k_scale folds into the softmax scale, v_scale multiplies each
split's output; both are host floats, fixed in a captured CUDA graph.

A layer's sliding window W (window, a compile-time constant; 0: off) leaves each sequence only its last
W positions to split and walk; a logit soft-cap (softcap, likewise) caps the scaled scores
(paged_attention_block). Neither costs anything when off.

decode_attention_ref is the torch reference (gather per sequence, dequantize, fp32 softmax).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.kernels.paged_attention_block import attend_block, check_kv_dtype, interpreting


# rows/lens are views into the step's packed ints at a traffic-dependent offset, read one value per
# program: alignment specialization would buy nothing and compile new variants on live traffic.
@triton.jit(do_not_specialize_on_alignment=["rows_ptr", "lens_ptr"])
def _decode_stage1(
    q_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    rows_ptr,
    lens_ptr,
    part_ptr,
    lse_ptr,
    scale,
    v_scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_tb,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_WHILE: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP16_MATH: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    s = tl.program_id(2)

    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    if WINDOW > 0:
        first = tl.maximum(seq_len - WINDOW, 0)
        split_len = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
        start = first + s * split_len
    else:
        split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = s * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kh * GROUP + offs_h

    b64 = b.to(tl.int64)
    q = tl.load(
        q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if FP16_MATH:  # fp8 blocks widen to fp16 in one instruction per pair; to bf16 they take several
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)

    if HAS_ROWS:
        slot_row = slot_ptr + tl.load(rows_ptr + b).to(tl.int64) * stride_tb
    else:
        slot_row = slot_ptr + b64 * stride_tb
    # Empty split (start >= end): the loop does not run, l_i stays 0 and lse is written as -inf.
    if USE_WHILE:
        # The interpreter (triton 3.6 with numpy 2.x) cannot run `range` over runtime bounds; a while loop
        # runs the same block step there.
        n0 = start
        while n0 < end:
            m_i, l_i, acc = attend_block(
                q,
                0,
                k_ptr,
                v_ptr,
                slot_row,
                kh,
                n0,
                end,
                m_i,
                l_i,
                acc,
                scale,
                stride_ks,
                stride_kh,
                stride_vs,
                stride_vh,
                HEAD_DIM,
                BLOCK_N,
                BLOCK_D,
                PRECISION,
                CAUSAL=False,
                WINDOW=0,
                SOFTCAP=SOFTCAP,
            )
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = attend_block(
                q,
                0,
                k_ptr,
                v_ptr,
                slot_row,
                kh,
                n0,
                end,
                m_i,
                l_i,
                acc,
                scale,
                stride_ks,
                stride_kh,
                stride_vs,
                stride_vh,
                HEAD_DIM,
                BLOCK_N,
                BLOCK_D,
                PRECISION,
                CAUSAL=False,
                WINDOW=0,
                SOFTCAP=SOFTCAP,
            )

    has = l_i > 0
    out = acc * (v_scale / tl.where(has, l_i, 1.0))[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(
        part_ptr + b64 * stride_pb + heads[:, None] * stride_ph + s * stride_ps + offs_d[None, :],
        out,
        mask=h_mask[:, None] & d_mask[None, :],
    )
    tl.store(lse_ptr + b64 * stride_lb + heads * stride_lh + s, lse, mask=h_mask)


@triton.jit
def _decode_stage2(
    part_ptr,
    lse_ptr,
    o_ptr,
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM

    lse = tl.load(
        lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf")
    )
    valid = lse > float("-inf")
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)
    w = tl.where(valid, tl.exp(lse - m), 0.0)
    w_sum = tl.sum(w, 0)
    part = tl.load(
        part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(part * w[:, None], 0) / tl.where(w_sum > 0, w_sum, 1.0)
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask
    )


# fp8 caches with bf16 queries: the block products in fp16 (decode_attention's fp16_math).
FP16_MATH_DEFAULT = False


def default_num_splits(max_len: int) -> int:
    """ceil(max_len / 256), at least 1, at most 16."""
    return max(1, min(16, triton.cdiv(max(max_len, 1), 256)))


def num_splits_for_batch(batch: int, num_kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Enough splits for about two programs per SM, from the batch shape alone (CUDA-graph safe)."""
    want = triton.cdiv(2 * num_sms, max(1, batch * num_kv_heads))
    return max(1, min(max_splits, triton.next_power_of_2(want)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
    rows: torch.Tensor | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    window: int | None = None,
    softcap: float | None = None,
    fp16_math: bool | None = None,
) -> torch.Tensor:
    """o[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over the seq_lens[b] slots table[r, :seq_lens[b]],
    r = rows[b] (or b without rows), K = k_cache * k_scale and V = v_cache * v_scale; with a window
    only the last `window` of those slots, with a softcap c the scores capped as c * tanh(s / c).

    q [B, H, D]; k_cache / v_cache [num_slots, H_kv, D] in q's dtype or fp8; slot_table [R, max_len]
    int32/int64; seq_lens [B] int (each <= max_len). Returns [B, H, D] in q's dtype.
    fp16_math: run the block products in fp16 (q clamped to fp16's range, K/V and the softmax weights
    widened to fp16; float32 sums either way) instead of q's dtype; None: FP16_MATH_DEFAULT for an
    fp8 cache with a bf16 q, off otherwise.
    """
    assert q.dim() == 3 and k_cache.dim() == 3 and v_cache.dim() == 3
    B, H, D = q.shape
    H_kv = k_cache.shape[1]
    assert k_cache.shape[2] == D and v_cache.shape == k_cache.shape, (
        "K/V cache shapes must match q's head_dim"
    )
    assert H % H_kv == 0, "num_heads must be divisible by num_kv_heads"
    assert D <= 256, "head_dim up to 256"
    assert slot_table.dim() == 2 and seq_lens.shape == (B,)
    assert (slot_table.shape[0] == B) if rows is None else (rows.shape == (B,))
    check_kv_dtype(q, k_cache, v_cache)
    assert not slot_table.dtype.is_floating_point and not seq_lens.dtype.is_floating_point

    # Innermost (head_dim) dimension must be unit-stride; other strides are passed through.
    if q.stride(2) != 1:
        q = q.contiguous()
    if k_cache.stride(2) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(2) != 1:
        v_cache = v_cache.contiguous()
    if slot_table.stride(1) != 1:
        slot_table = slot_table.contiguous()

    max_len = slot_table.shape[1]
    if num_splits is None:
        num_splits = default_num_splits(max_len)
    num_splits = max(1, int(num_splits))

    group = H // H_kv
    BLOCK_H = max(16, triton.next_power_of_2(group))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if block_n is None:
        # fp8 caches: twice the tokens per load for the same bytes (H100, bs256 x 512-768 tokens, 32/8
        # heads of 128: 0.226 ms at 128 against 0.253 ms at 64; bf16 is flat across block sizes).
        block_n = 32 if BLOCK_D >= 256 else (128 if k_cache.element_size() == 1 else 64)
    BLOCK_N = block_n
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if fp16_math is None:
        fp16_math = FP16_MATH_DEFAULT and k_cache.element_size() == 1 and q.dtype == torch.bfloat16

    o = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    part = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)

    _decode_stage1[(B, H_kv, num_splits)](
        q,
        k_cache,
        v_cache,
        slot_table,
        seq_lens if rows is None else rows,
        seq_lens,
        part,
        lse,
        float(scale) * float(k_scale),
        float(v_scale),
        num_splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        slot_table.stride(0),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        GROUP=group,
        HEAD_DIM=D,
        BLOCK_H=BLOCK_H,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        PRECISION=precision,
        USE_WHILE=interpreting(),
        HAS_ROWS=rows is not None,
        WINDOW=int(window or 0),
        SOFTCAP=float(softcap or 0.0),
        FP16_MATH=bool(fp16_math),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    merge_splits(part, lse, o, num_splits, D, BLOCK_D)
    return o


def merge_splits(part, lse, o, num_splits: int, head_dim: int, block_d: int) -> None:
    """Stage 2: o[b, h] = the splits' partial outputs part [B, H, S, D] weighted by their
    log-sum-exps lse [B, H, S] (also kernels/mla_decode.py's)."""
    B, H = o.shape[0], o.shape[1]
    _decode_stage2[(B, H)](
        part,
        lse,
        o,
        num_splits,
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        o.stride(0),
        o.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        BLOCK_D=block_d,
        num_warps=4,
    )


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    rows: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Torch reference: per sequence, gather its K/V slots (the last `window` of them with a window),
    dequantize (x * scale) and run an fp32 softmax attention (scores capped with a softcap)."""
    B, H, D = q.shape
    H_kv = k_cache.shape[1]
    group = H // H_kv
    o = torch.zeros((B, H, D), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        row = b if rows is None else int(rows[b])
        first = max(0, n - window) if window else 0
        slots = slot_table[row, first:n].long()
        k = (k_cache[slots].float() * k_scale).repeat_interleave(group, dim=1)  # [n, H, D]
        v = (v_cache[slots].float() * v_scale).repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        p = torch.softmax(s, dim=-1)
        o[b] = torch.einsum("hn,nhd->hd", p, v)
    return o.to(q.dtype)
