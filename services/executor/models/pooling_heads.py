"""Decoders served as embedders or classifiers (--is-embedding), derived from a *ForCausalLM class.

- `XModel` (e.g. MistralModel, Qwen2Model): the decoder stack alone, as sentence-transformers
  folders store it; checkpoint names lack the `model.` prefix and there is no LM head.
- `XForSequenceClassification` (reward models, classifiers): the decoder and `score`, a linear
  map without bias from the hidden state to num_labels scores, read at the sequence's last token.

X is any architecture whose `XForCausalLM` is registered; the derived class keeps X's forward
and weight loading and drops its LM head, so these models never generate.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import torch
from torch import nn

from radixserve.common.pooling_models import (
    BARE_DECODER_SUFFIX,
    SEQUENCE_CLASSIFIER_SUFFIX,
    causal_lm_base,
)
from radixserve.executor.layers.linear import ReplicatedLinear
from radixserve.executor.model_config import ModelConfig


class PoolingOnly(nn.Module):
    """Mixin over a causal LM: no LM head; forward still returns the final hidden states."""

    checkpoint_prefix = "model."  # prepended to checkpoint names that lack it

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        del self.lm_head
        self.tie_word_embeddings = False

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.config.architecture} has no LM head: it serves --is-embedding only")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((self._param_name(name), t) for name, t in weights)

    def _param_name(self, name: str) -> str:
        return name if name.startswith(self.checkpoint_prefix) else self.checkpoint_prefix + name


class SequenceClassifier(PoolingOnly):
    """Mixin: `score` over the last token's hidden state -> num_labels scores."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.score = ReplicatedLinear(config.get("hidden_size"), num_labels(config), bias=False)

    def _param_name(self, name: str) -> str:
        return name if name.startswith("score.") else super()._param_name(name)

    def classify(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """[B, hidden] states of each sequence's last token -> [B, num_labels] float32 scores."""
        return self.score(last_hidden.to(self.score.weight.dtype)).float()


def num_labels(config: ModelConfig) -> int:
    """HF's rule: id2label's size when the config has one, else num_labels (default 2)."""
    id2label = config.get("id2label")
    return len(id2label) if id2label else int(config.get("num_labels", 2))


HEADS = {SEQUENCE_CLASSIFIER_SUFFIX: SequenceClassifier, BARE_DECODER_SUFFIX: PoolingOnly}


def derived_model_class(architecture: str, registry: Mapping[str, type]) -> type | None:
    """The class for `architecture` built on its registered *ForCausalLM, else None."""
    for suffix, head in HEADS.items():
        base = registry.get(causal_lm_base(architecture, suffix) or "")
        if base is not None:
            return _derive(head, base)
    return None


@functools.cache
def _derive(head: type, base: type) -> type:
    return type(f"{base.__name__}{head.__name__}", (head, base), {})
