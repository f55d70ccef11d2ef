"""Triton gated activations for MLPs: gate_up [T, 2*I] -> act(gate) * up [T, I], with act SiLU or
GELU's tanh approximation (Gemma's GeGLU, HF's gelu_pytorch_tanh).

Computed in float32, stored in the input dtype (GELU: rounded to it before the product, as torch's
gelu-then-mul is). Grid: (T, cdiv(I, BLOCK)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from radixserve.kernels.paged_attention_block import tanh


@triton.jit
def _gated_kernel(
    gu_ptr, out_ptr, stride_gu, stride_out, I, GELU: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) (g + 0.044715 g^3)
        act = 0.5 * g * (1.0 + tanh(inner))
        dtype = out_ptr.dtype.element_ty
        y = act.to(dtype).to(tl.float32) * u
    else:
        y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _gated(gate_up, gelu=False)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _gated(gate_up, gelu=True)


def _gated(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    two_i = gate_up.shape[-1]
    assert two_i % 2 == 0, two_i
    inter = two_i // 2
    gu = gate_up.reshape(-1, two_i)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    rows = gu.shape[0]
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows and inter:
        block = min(1024, triton.next_power_of_2(inter))
        _gated_kernel[(rows, triton.cdiv(inter, block))](
            gu,
            out,
            gu.stride(0),
            out.stride(0),
            inter,
            GELU=gelu,
            BLOCK=block,
            num_warps=4,
        )
    return out.view(*gate_up.shape[:-1], inter)


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def gelu_tanh_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """torch's gelu(gate, approximate="tanh") * up in the input dtype (what layers/activation.py runs
    off CUDA)."""
    half = gate_up.shape[-1] // 2
    return F.gelu(gate_up[..., :half], approximate="tanh") * gate_up[..., half:]
