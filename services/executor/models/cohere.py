"""Cohere Command-R (CohereForCausalLM): attention and MLP in parallel on one LayerNorm without bias,
a rotary over interleaved pairs (2j, 2j+1), logits multiplied by logit_scale, optional LayerNorms
per q and k head (use_qk_norm), embeddings tied unless the config says otherwise."""

from __future__ import annotations

import torch
from torch import nn

from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaAttention
from radixserve.executor.models.stablelm import LayerNormCausalLM, PerHeadNormAttention


class CohereForCausalLM(LayerNormCausalLM):
    norm_bias = False
    interleaved_rotary = True

    def __init__(self, config: ModelConfig):
        config.hf.setdefault("tie_word_embeddings", True)  # HF's CohereConfig default
        super().__init__(config)
        self.logit_scale = float(config.get("logit_scale", 0.0625))

    def make_attention(self, config: ModelConfig, layer_id: int) -> nn.Module:
        bias = bool(config.get("attention_bias", False))
        if config.get("use_qk_norm", False):
            eps = config.get("layer_norm_eps", 1e-5)
            return PerHeadNormAttention(config, layer_id, bias, bias, eps)
        return LlamaAttention(config, layer_id, bias, bias)

    def parallel(self, config: ModelConfig) -> bool:
        return True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.lm_head(hidden) * self.logit_scale).float()
