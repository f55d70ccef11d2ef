"""Triton RMSNorm, optionally fused with the residual add before it (GPU executor).

Numerics follow HF transformers and services/executor/layers/norm.py:
  residual add in the activation dtype (rounded), normalize in float32
  (h * rsqrt(mean(h^2) + eps)), round to the activation dtype, then multiply by the weight in the
  activation dtype (product computed in fp32 and rounded once, which is what torch does for bf16/fp16).
  With unit_offset (Gemma): the float32 normalized row times (1 + weight) in float32, rounded once.
One program per token row; the whole row is one block (BLOCK = next power of 2 of hidden, up to 8192).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 8192


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_new_res,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # add in fp32, round once to the activation dtype (== torch's x + residual)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(new_res_ptr + row * stride_new_res + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / N
    h = h * tl.rsqrt(var + eps)
    if UNIT_OFFSET:
        w = 1.0 + tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        h = h.to(dtype).to(tl.float32)  # round to the activation dtype before the weight
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (h * w).to(dtype), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _launch(x, residual, weight, eps, unit_offset=False):
    n = x.shape[-1]
    if n > MAX_HIDDEN:
        raise ValueError(f"hidden size {n} > {MAX_HIDDEN}")
    assert weight.shape == (n,), (weight.shape, n)
    x2 = _rows(x, n)
    rows = x2.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    weight = weight.contiguous()
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (
            residual.shape,
            residual.dtype,
        )
        r2 = _rows(residual, n)
        new_res = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    else:
        r2, new_res = x2, out  # unused
    if rows:
        block = triton.next_power_of_2(n)
        num_warps = min(max(block // 256, 1), 8)
        _rmsnorm_kernel[(rows,)](
            x2,
            r2,
            weight,
            out,
            new_res,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            new_res.stride(0),
            n,
            float(eps),
            HAS_RESIDUAL=residual is not None,
            UNIT_OFFSET=unit_offset,
            BLOCK=block,
            num_warps=num_warps,
        )
    out = out.view(x.shape)
    if residual is None:
        return out
    return out, new_res.view(x.shape)


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, unit_offset: bool = False
) -> torch.Tensor:
    """RMSNorm over the last dim of x; returns a new tensor in x.dtype."""
    return _launch(x, None, weight, eps, unit_offset)


def fused_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    unit_offset: bool = False,
):
    """(rmsnorm(x + residual), x + residual) as new tensors; the inputs are not modified."""
    return _launch(x, residual, weight, eps, unit_offset)


def rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, unit_offset: bool = False
) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight.to(x.dtype) * h.to(x.dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    unit_offset: bool = False,
):
    new_res = x + residual
    return rmsnorm_ref(new_res, weight, eps, unit_offset), new_res
