"""The interface attention backends (torch_native, triton; see registry.py) implement."""

from __future__ import annotations

import abc

import torch

from radixserve.executor.attention.metadata import ForwardBatch
from radixserve.executor.layers.rotary import RopeStep


class AttentionBackend(abc.ABC):
    # Reads a decode step only from device tensors (no host lengths), so CUDA graphs can capture it.
    supports_cuda_graphs = False
    # Takes a speculative verify step's tokens as decode rows: token i of a request with prefix P is
    # a row over the request's table row with length P + i + 1. All rows' K/V are stored before any
    # row attends, so each row sees the drafts before it and itself: causal, with no extend kernel,
    # and a verify step replays the decode CUDA graphs.
    verify_as_decode_rows = False

    @abc.abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Build per-step tensors once (not per layer); store them in batch.attn_metadata."""

    @abc.abstractmethod
    def forward(
        self, qk: torch.Tensor, v: torch.Tensor, rope: RopeStep, layer, batch: ForwardBatch
    ) -> torch.Tensor:
        """Rotate q and k with the step's rope, write k/v at batch.out_slots, then attend.

        qk is [T, heads + kv_heads, head_dim], q heads first, not yet rotated (a backend may fuse the
        rotation into its KV store); v is [T, kv_heads, head_dim]. Returns [T, heads * head_dim].
        """

    @staticmethod
    def rotate(qk: torch.Tensor, rope: RopeStep, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, head_dim] and k [T, kv_heads, head_dim], rotated (for backends that do not fuse it)."""
        qk = rope.rotate(qk, layer.num_heads)
        return qk[:, : layer.num_heads], qk[:, layer.num_heads :]
