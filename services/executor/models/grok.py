"""Grok-1 (remote code only: the HF port's Grok1ModelForCausalLM, registered also as Grok1ForCausalLM).

Per layer: x + post_attn_norm(attn(pre_attn_norm(x))), then + post_moe_norm(moe(pre_moe_norm(.)))
(four RMSNorms). Attention scores are q.k * attn_output_multiplier, soft-capped to
max_attn_value * tanh(score / max_attn_value) (Attention's logit_softcap). The MoE
routes each token to its top-k experts by softmax probability, not renormalized; each expert is
gelu(linear(x)) * linear_v(x) -> linear_1 (exact GELU, as the port's nn.GELU()). Embeddings are
multiplied by embedding_multiplier_scale, logits by output_multiplier_scale.

Checkpoint names (the HF port's): model.embed_tokens, model.layers.<i>.{attn.{q,k,v,o}_proj,
moe_block.gate, moe_block.experts.<j>.{linear, linear_v, linear_1}, <pre|post>_<attn|moe>_norm.scale},
model.norm.scale, lm_head (tied to the embedding unless tie_word_embeddings is false).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Iterable

import torch
from torch import nn

from radixserve.executor.layers.moe import SparseMoeBlock
from radixserve.executor.layers.norm import RMSNorm
from radixserve.executor.layers.rotary import RopeStep
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.gemma import gemma_attention
from radixserve.executor.models.moe_causal_lm import MoeCausalLM, config_num_experts

# The port's gate activation; a config that names hidden_act picks the tanh approximation where it says so.
_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_NORM_SCALE = re.compile(r"norm\.scale$")


def grok_norm(config: ModelConfig) -> RMSNorm:
    return RMSNorm(
        config.get("hidden_size"), config.get("rms_norm_eps", 1e-5)
    )  # the port's default


class GrokDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.pre_attn_norm = grok_norm(config)
        self.post_attn_norm = grok_norm(config)
        self.pre_moe_norm = grok_norm(config)
        self.post_moe_norm = grok_norm(config)

    def forward(self, x, residual, rope: RopeStep):
        """x: the previous layer's output (still to be added to the residual stream `residual`)."""
        if residual is None:
            residual = x
            x = self.pre_attn_norm(x)
        else:
            x, residual = self.pre_attn_norm(x, residual)
        x = self.post_attn_norm(self.self_attn(x, rope))
        x, residual = self.pre_moe_norm(x, residual)
        return self.post_moe_norm(self.mlp(x)), residual


class Grok1ForCausalLM(MoeCausalLM):
    expert_shards = {"linear": "gate", "linear_v": "up", "linear_1": "down"}
    checkpoint_renames = {".attn.": ".self_attn.", ".moe_block.": ".mlp."}

    def __init__(self, config: ModelConfig):
        # The port's config ties the LM head to the embedding by default (and may leave the key out).
        config = replace(config, hf={"tie_word_embeddings": True} | config.hf)
        super().__init__(config)
        self.embedding_scale = float(config.get("embedding_multiplier_scale", 1.0))
        self.output_scale = float(config.get("output_multiplier_scale", 1.0))

    def make_norm(self, config: ModelConfig) -> nn.Module:
        return grok_norm(config)

    def make_layer(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return GrokDecoderLayer(
            config, self.make_attention(config, layer_id), self.make_mlp(config, layer_id)
        )

    def make_attention(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return gemma_attention(  # Llama's block with another scaling and a soft-cap
            config,
            layer_id,
            scaling=float(config.get("attn_output_multiplier", config.head_dim**-0.5)),
            logit_softcap=float(config.get("max_attn_value", 30.0)),
        )

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        act = config.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"Grok-1 with hidden_act {act!r}: supported {sorted(_ACTIVATIONS)}")
        return SparseMoeBlock(
            config.get("hidden_size"),
            config_num_experts(config),
            config.get("num_experts_per_tok", 2),
            config.get("intermediate_size"),
            renormalize=False,
            activation=_ACTIVATIONS[act],
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rope = self.rotary_emb.prepare(positions)
        x = self.model.embed_tokens(input_ids) * self.embedding_scale
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) * self.output_scale

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((_NORM_SCALE.sub("norm.weight", n), t) for n, t in weights)


class Grok1ModelForCausalLM(Grok1ForCausalLM):
    """The name the HF port's config.json gives the architecture."""
