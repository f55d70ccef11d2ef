"""The interface attention backends (torch_native, triton; see registry.py) implement."""
from __future__ import annotations

import abc

import torch

from services.executor.attention.metadata import ForwardBatch
from services.executor.layers.rotary import RopeStep


class AttentionBackend(abc.ABC):
    @abc.abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Build per-step tensors once (not per layer); store them in batch.attn_metadata."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, batch: ForwardBatch) -> torch.Tensor:
        """Write k/v [T, kv_heads, head_dim] at batch.out_slots, then attend.

        q is [T, heads, head_dim]; returns [T, heads * head_dim].
        """

    def forward_with_rope(self, qk: torch.Tensor, v: torch.Tensor, rope: RopeStep, layer,
                          batch: ForwardBatch) -> torch.Tensor:
        """What models call (through Attention): rotate q and k with the step's rope, then forward().

        qk is [T, heads + kv_heads, head_dim], q heads first, not yet rotated. A backend that can fuse
        the rotation into its KV store (triton) overrides this; the others keep this default.
        """
        qk = rope.rotate(qk, layer.num_heads)
        return self.forward(qk[:, :layer.num_heads], qk[:, layer.num_heads:], v, layer, batch)
