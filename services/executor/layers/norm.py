"""RMSNorm, optionally fused with the residual add that precedes it.

Numerics follow HF transformers: normalize in float32, round to the activation dtype, then scale
by the weight in that dtype. In bf16 the shortcuts (scaling by a bf16 1/rms, or folding the weight
into the next linear) change greedy answers of small models, so none are taken.
On CUDA the Triton kernel (kernels/rmsnorm.py, same numerics) does the add and the norm in one pass.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.hidden_size = hidden_size

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        if (
            x.is_cuda and not torch.compiler.is_compiling()
        ):  # compiled: inductor fuses the torch code
            from radixserve.kernels import rmsnorm

            if residual is None:
                return rmsnorm.rmsnorm(x, self.weight, self.eps)
            return rmsnorm.fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._normalize(x)
        residual = x.add_(residual)
        return self._normalize(residual), residual
