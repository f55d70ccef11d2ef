"""RMSNorm, optionally fused with the residual add that precedes it.

A norm whose output feeds only linear layers can have its weight folded into those layers
(`fold_into`), which leaves the per-token 1/rms scale: fewer ops per layer on the decode path.
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
        self.weight_folded = False
        self.register_buffer("_eps", torch.tensor(eps, dtype=torch.float32), persistent=False)

    def fold_into(self, *linears) -> None:
        """Multiply this norm's weight into the input columns of the linears it feeds."""
        scale = self.weight.data.float()
        for linear in linears:
            linear.weight.data.copy_(linear.weight.data.float() * scale[None, :])
        self.weight_folded = True

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, dtype=torch.float32)
        inv_rms = torch.addcmul(self._eps, norm, norm, value=1.0 / self.hidden_size).rsqrt_()
        # Scale in the activation dtype: converting the [T, hidden] tensor costs more than the rounding saves.
        out = x * inv_rms.to(x.dtype)
        return out if self.weight_folded else out.mul_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        if residual is None:
            return self._normalize(x)
        residual = x.add_(residual)
        return self._normalize(residual), residual
