"""The attention op models call: it knows its layer and shapes, the step comes from the context."""

from __future__ import annotations

import torch
from torch import nn

from radixserve.executor import compiled_ops
from radixserve.executor.attention.metadata import get_forward_batch
from radixserve.executor.layers.rotary import RopeStep


class Attention(nn.Module):
    def __init__(
        self,
        layer_id: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scaling: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ):
        """sliding_window W: a query at position p sees keys at positions p - W + 1 .. p (None: all);
        logit_softcap c: scores become c * tanh(score / c) before the softmax (None: off). Both are
        fixed per layer (the KV of every position stays cached; the window only masks)."""
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = scaling
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap or None
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
