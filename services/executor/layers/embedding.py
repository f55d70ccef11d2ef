"""Token embedding and LM head, each rank holding a slice of the vocabulary.

The embedding looks up the ids of its slice (others read as zeros) and all-reduces; the LM head
computes the logits of its slice and all-gathers them, so every rank holds the whole row (rank 0
samples from it). With a vocabulary that does not split evenly the last slice is padded with zero
rows, whose logits are cut off after the gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.executor import quantization
from radixserve.executor.layers.linear import LinearBase, default_weight_loader
from radixserve.executor.parallel_state import all_gather_last_dim, all_reduce, tp_rank, tp_size


def _load_vocab_slice(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """This rank's rows of a [vocab, ...] tensor; rows past the vocabulary are zeroed."""
    rows = param.shape[0]
    start = tp_rank() * rows
    n = max(0, min(rows, loaded.shape[0] - start))
    default_weight_loader(param.data.narrow(0, 0, n), loaded.narrow(0, start, n))
    param.data[n:].zero_()


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.rows = (vocab_size + tp_size() - 1) // tp_size()
        # None: a plain weight; else the quantization scheme's (e.g. GGUF blocks), looked up by it.
        self.quant = quantization.embedding_method()
        if self.quant is not None:
            self.quant.create_weights(self, hidden_size, self.rows, torch.get_default_dtype())
            return
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def process_weights_after_loading(self) -> None:
        if self.quant is not None:
            self.quant.process_weights_after_loading(self)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _load_vocab_slice(param, loaded)

    def full_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        return (self.vocab_size, *param.shape[1:])

    def load_full(self, param: nn.Parameter, full: torch.Tensor) -> None:
        self.weight_loader(param, full)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.embed(self, input_ids)
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - tp_rank() * self.rows
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return all_reduce(x)


class ParallelLMHead(LinearBase):
    """hidden -> logits over the whole vocabulary (this rank computes its slice); may share the
    embedding's weight."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False):
        self.vocab_size = vocab_size
        # Unquantized, as fp8 / AWQ / GPTQ checkpoints keep it, unless the scheme stores it (GGUF).
        with quantization.building_lm_head():
            super().__init__(hidden_size, (vocab_size + tp_size() - 1) // tp_size(), bias)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (a quantized embedding's blocks too: the head's method reads
        the same parameter)."""
        self.weight = embedding.weight

    def weight_loader(self, param, loaded, shard_id=None):
        _load_vocab_slice(param, loaded)

    def full_shape(self, param):
        return (self.vocab_size, *param.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if tp_size() == 1:
            return logits
        return all_gather_last_dim(logits)[..., : self.vocab_size]
