"""Gated activations over a fused [gate | up] projection (SiLU: a Triton kernel on CUDA)."""

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.is_cuda and not torch.compiler.is_compiling()
        ):  # compiled: inductor fuses the torch code
            from radixserve.kernels.silu_mul import silu_and_mul

            return silu_and_mul(x)
        half = x.shape[-1] // 2
        return F.silu(x[..., :half]).mul_(x[..., half:])


class GeluAndMul(nn.Module):
    """GeGLU: gelu(gate) * up; approximate "tanh" (HF's gelu_pytorch_tanh) or "none" (exact gelu)."""

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"gelu approximation must be 'tanh' or 'none', not {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.approximate == "tanh" and not torch.compiler.is_compiling():
            from radixserve.kernels.silu_mul import gelu_tanh_and_mul

            return gelu_tanh_and_mul(x)
        half = x.shape[-1] // 2
        return F.gelu(x[..., :half], approximate=self.approximate).mul_(x[..., half:])
