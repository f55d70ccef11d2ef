"""The attention op models call: it knows its layer and shapes, the step comes from the context."""
from __future__ import annotations

import torch
from torch import nn

from services.executor.attention.metadata import get_forward_batch


class Attention(nn.Module):
    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = scaling

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = get_forward_batch()
        return batch.attn_backend.forward(q, k, v, self, batch)
