"""Gated activations over a fused [gate | up] projection (a Triton kernel on CUDA)."""

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
