"""The online-softmax step both paged attention kernels (decode_attention, extend_attention) take
over one block of key positions, gathering K/V rows through a sequence's slot-table row.

K/V may be stored in fp8 (an fp8 KV cache): they are converted to the query's dtype as they load, and
the cache's scales are applied by the callers (the K scale folded into `scale`, the V scale into the
final output), so the block step itself never multiplies by them.

Two per-layer options, compile-time constants (0: off, and then no code at all): SOFTCAP c caps the
scaled scores as c * tanh(score / c) (Gemma 2); WINDOW W (with CAUSAL) hides the keys at positions
<= q_pos - W, a sliding window of W keys ending at the query itself (HF: kv > q - W)."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def num_sms(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (8 off CUDA: the interpreter's grids stay small)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreting() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1): the kernels then walk key
    blocks with a while loop, since the interpreter (triton 3.6, numpy 2.x) cannot run `range` over
    runtime bounds."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# An fp8 KV cache's dtypes: (largest finite value, mantissa bits, smallest normal exponent).
FP8_KV_FORMATS = {
    torch.float8_e4m3fn: (448.0, 3, -6),
    torch.float8_e5m2: (57344.0, 2, -14),
}


def check_kv_dtype(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The caches share one dtype: q's, or an fp8 one."""
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)
    assert k_cache.dtype == q.dtype or k_cache.dtype in FP8_KV_FORMATS, (
        f"the KV cache must be in q's dtype ({q.dtype}) or fp8, not {k_cache.dtype}"
    )


@triton.jit
def tanh(x):
    """tanh from exp (the interpreter has no libdevice), to within a few float32 ulps of 1."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def attend_block(
    q,
    q_pos,
    k_ptr,
    v_ptr,
    slot_row,
    kh,
    n0,
    kv_end,
    m_i,
    l_i,
    acc,
    scale,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Positions [n0, min(n0 + BLOCK_N, kv_end)), n0 < kv_end, folded into the running (m_i, l_i, acc) of
    the query rows q; with CAUSAL, row r sees only positions <= q_pos[r].

    Every row sees some position of the block (decode: n0 < kv_end; extend: rows see position 0 in the
    first block and so have a finite m_i from then on), so m_new is finite and exp(-inf - m_new) = 0.
    With a WINDOW a row may see nothing of a block (all of it before its window): its state stays.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = n0 + offs_n
    n_mask = pos < kv_end
    slots = tl.load(slot_row + pos, mask=n_mask, other=0).to(tl.int64)
    kv_mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(
        k_ptr + slots[:, None] * stride_ks + kh * stride_kh + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    k = k.to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [rows, BLOCK_N] fp32
    if SOFTCAP > 0:
        qk = tanh(qk / SOFTCAP) * SOFTCAP
    if CAUSAL:
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if WINDOW > 0:
            visible = visible & (pos[None, :] > q_pos[:, None] - WINDOW)
    else:
        visible = n_mask[None, :]
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if WINDOW > 0:
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows that have seen nothing yet
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(qk - m_ref[:, None])
    else:
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_ptr + slots[:, None] * stride_vs + kh * stride_vh + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return m_new, l_i, acc
