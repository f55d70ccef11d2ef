"""Token embedding and LM head, each rank holding a slice of the vocabulary (tp=1 today)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.executor.layers.linear import LinearBase, default_weight_loader
from services.executor.parallel_state import tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.rows = (vocab_size + tp_size() - 1) // tp_size()
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        start = tp_rank() * self.rows
        rows = min(self.rows, loaded.shape[0] - start)
        default_weight_loader(param.data.narrow(0, 0, rows), loaded.narrow(0, start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class ParallelLMHead(LinearBase):
    """hidden -> logits over this rank's vocabulary slice; may share the embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False):
        self.vocab_size = vocab_size
        super().__init__(hidden_size, (vocab_size + tp_size() - 1) // tp_size(), bias)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def weight_loader(self, param, loaded, shard_id=None):
        rows = param.shape[0]
        start = tp_rank() * rows
        n = min(rows, loaded.shape[0] - start)
        default_weight_loader(param.data.narrow(0, 0, n), loaded.narrow(0, start, n))
