"""Gemma 2: Gemma with a norm before and after both the attention and the MLP of each layer, scores
scaled by query_pre_attn_scalar ** -0.5 and soft-capped (attn_logit_softcapping), a sliding window on
the layers config `layer_types` calls sliding (by default every other one, from layer 0), and soft-capped
final logits (final_logit_softcapping)."""

from __future__ import annotations

import torch
from torch import nn

from radixserve.executor.layers.activation import GeluAndMul
from radixserve.executor.layers.rotary import RopeStep
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.gemma import (
    GELU,
    GemmaForCausalLM,
    GemmaRMSNorm,
    gelu_approximation,
    gemma_attention,
)
from radixserve.executor.models.llama import LlamaAttention, LlamaMLP
from radixserve.executor.models.mistral import effective_sliding_window


def is_sliding_layer(config: ModelConfig, layer_id: int, default_pattern: int) -> bool:
    """From config `layer_types`, else HF's default: every `sliding_window_pattern`-th layer (counting
    from 1) is global, the others sliding."""
    types = config.get("layer_types")
    if types:
        return types[layer_id] == "sliding_attention"
    pattern = int(config.get("sliding_window_pattern") or default_pattern)
    return (layer_id + 1) % pattern != 0


class Gemma2DecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention
    default_sliding_pattern = 2

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        hidden, eps = config.get("hidden_size"), config.get("rms_norm_eps", 1e-6)
        self.is_sliding = is_sliding_layer(config, layer_id, self.default_sliding_pattern)
        window = config.get("sliding_window") if self.is_sliding else None
        self.self_attn = gemma_attention(
            config,
            layer_id,
            scaling=float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
            sliding_window=effective_sliding_window(config, window),
            logit_softcap=config.get("attn_logit_softcapping"),
            attention_cls=self.attention_cls,
        )
        self.mlp = LlamaMLP(hidden, config.get("intermediate_size"), bias=False)
        act = config.get("hidden_activation") or "gelu_pytorch_tanh"
        self.mlp.act = GeluAndMul(gelu_approximation(act, GELU))
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeStep):
        """(this layer's output, the residual stream before it): the next norm adds them."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, rope))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma2ForCausalLM(GemmaForCausalLM):
    def make_layer(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return Gemma2DecoderLayer(config, layer_id)
