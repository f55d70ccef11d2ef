"""The interface attention backends (torch_native, triton; see registry.py) implement."""
from __future__ import annotations

import abc

import torch

from services.executor.attention.metadata import ForwardBatch


class AttentionBackend(abc.ABC):
    @abc.abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Build per-step tensors once (not per layer); store them in batch.attn_metadata."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, batch: ForwardBatch) -> torch.Tensor:
        """Write k/v [T, kv_heads, head_dim] at batch.out_slots, then attend.

        q is [T, heads, head_dim]; returns [T, heads * head_dim].
        """
