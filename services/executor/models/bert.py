"""BERT-family encoders (BertModel, XLMRobertaModel) for --is-embedding: the last hidden states
of a right-padded batch, every token attending to every real token of its sequence.

Unlike the decoders this runs on padded [B, L] batches, needs no KV cache and no forward context:
attention is one scaled_dot_product_attention call per layer with a key-padding mask. Module names
follow HF's, so checkpoints load by name. Only single-segment inputs (token type 0) are embedded.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.executor.layers.linear import default_weight_loader
from radixserve.executor.model_config import ModelConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# Checkpoint tensors that are no parameter of an encoder: buffers, the pooler and pretraining heads.
IGNORED_PREFIXES = ("pooler.", "cls.", "lm_head.")
IGNORED_SUFFIXES = ("position_ids", "token_type_ids")


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.get("hidden_size")
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(config.get("max_position_embeddings"), hidden)
        self.token_type_embeddings = nn.Embedding(config.get("type_vocab_size", 2), hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.get("layer_norm_eps", 1e-12))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, length, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=key_mask
        )
        return o.transpose(1, 2).reshape(b, length, hidden)


class BertDenseNorm(nn.Module):
    """dense, then LayerNorm of (that + residual): HF's BertSelfOutput and BertOutput."""

    def __init__(self, in_features: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, num_heads)
        self.output = BertDenseNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(ACTIVATIONS)}")
        self.dense = nn.Linear(hidden, intermediate)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, eps = config.get("hidden_size"), config.get("layer_norm_eps", 1e-12)
        intermediate = config.get("intermediate_size")
        self.attention = BertAttention(hidden, config.num_heads, eps)
        self.intermediate = BertIntermediate(hidden, intermediate, config.get("hidden_act", "gelu"))
        self.output = BertDenseNorm(intermediate, hidden, eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))


class BertModel(nn.Module):
    checkpoint_prefix = "bert."  # of the encoder's tensors in a BertFor* checkpoint

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {config.get('position_embedding_type')!r} is not supported"
            )
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    @property
    def pad_token_id(self) -> int:
        return self.config.get("pad_token_id") or 0

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position embeddings cover."""
        return self.config.get("max_position_embeddings")

    def positions(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, L, H] of right-padded input_ids [B, L]; mask [B, L] is 1 on real tokens."""
        x = self.embeddings(input_ids, self.positions(input_ids, mask))
        key_mask = mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix(self.checkpoint_prefix)
            if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name} has no matching parameter")
            default_weight_loader(params[name], tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {missing[:8]}")


class XLMRobertaModel(BertModel):
    """BERT with positions counted from pad_token_id + 1 (RoBERTa's convention) and one token type."""

    checkpoint_prefix = "roberta."

    @property
    def pad_token_id(self) -> int:
        return self.config.get("pad_token_id", 1)

    @property
    def max_tokens(self) -> int:
        return self.config.get("max_position_embeddings") - self.pad_token_id - 1

    def positions(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        real = mask.long()
        return torch.cumsum(real, dim=1) * real + self.pad_token_id
