"""The attention op models call: it knows its layer and shapes, the step comes from the context."""

from __future__ import annotations

import torch
from torch import nn

from radixserve.executor import compiled_ops
from radixserve.executor.attention.metadata import get_forward_batch
from radixserve.executor.layers.rotary import RopeStep


class Attention(nn.Module):
    def __init__(
        self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float
    ):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = scaling
        self.compiled_key = compiled_ops.register_layer(self)

    def forward(self, qk: torch.Tensor, v: torch.Tensor, rope: RopeStep) -> torch.Tensor:
        """qk [T, heads + kv_heads, head_dim] (q heads first) not yet rotated, v [T, kv_heads, head_dim]:
        the backend rotates q and k with `rope` (on its own or fused with its KV store), stores k and v,
        attends. Returns [T, heads * head_dim]."""
        if torch.compiler.is_compiling():  # opaque to torch.compile: compiled_ops.py
            return compiled_ops.attention(
                qk, v, rope.cos_table, rope.sin_table, rope.positions, self.compiled_key
            )
        batch = get_forward_batch()
        return batch.attn_backend.forward(qk, v, rope, self, batch)
