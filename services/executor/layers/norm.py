"""RMSNorm, optionally fused with the residual add that precedes it; LayerNorm (StableLM, Cohere),
over the hidden size or per attention head.

Numerics follow HF transformers: normalize in float32, round to the activation dtype, then scale
by the weight in that dtype. In bf16 the shortcuts (scaling by a bf16 1/rms, or folding the weight
into the next linear) change greedy answers of small models, so none are taken.
On CUDA the Triton kernel (kernels/rmsnorm.py, same numerics) does the add and the norm in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.executor.layers.linear import default_weight_loader


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


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, computed in float32 and rounded to the activation dtype once;
    weight, and a bias unless bias=False (Cohere's, DBRX's). Called like RMSNorm: norm(x), or with a
    residual (norm(x + residual), x + residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            residual = x.add_(residual)
            return self.forward(residual), residual
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.weight.shape, self.weight.float(), bias, self.eps).to(
            x.dtype
        )


class PerHeadLayerNorm(nn.Module):
    """LayerNorm of each head of x [T, heads, head_dim] with its own weight (no bias): the q/k norm
    of StableLM and Cohere. Holds this rank's heads; the checkpoint's [all heads, head_dim] weight
    is narrowed to them from `first_head`."""

    def __init__(self, heads: int, head_dim: int, eps: float, first_head: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.eps, self.first_head = eps, first_head

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        default_weight_loader(param, loaded.narrow(0, self.first_head, param.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)
        return (h * self.weight.float()).to(x.dtype)
