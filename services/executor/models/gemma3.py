"""Gemma 3 (text only, Gemma3ForCausalLM): Gemma 2's layer with an RMSNorm over each q and k head
before the rotary embedding, five sliding (local) layers to one global by default, and two rotary
tables: the local layers' base rope_local_base_freq (10k), the global layers' rope_theta (1M, with
the config's rope scaling)."""

from __future__ import annotations

from radixserve.executor.layers.rotary import RotaryEmbedding, rope_settings
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.gemma import GemmaRMSNorm
from radixserve.executor.models.gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM
from radixserve.executor.models.qwen3_moe import QKNormAttention


class Gemma3Attention(QKNormAttention):
    def __init__(self, config: ModelConfig, layer_id: int, qkv_bias: bool, o_bias: bool):
        super().__init__(config, layer_id, qkv_bias, o_bias)
        eps = config.get("rms_norm_eps", 1e-6)
        self.q_norm = GemmaRMSNorm(self.head_dim, eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, eps)


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_cls = Gemma3Attention
    default_sliding_pattern = 6


def gemma3_rope(hf: dict, layer_type: str) -> tuple[float, dict]:
    """(theta, scaling) of "sliding_attention" or "full_attention" layers, from transformers-5
    `rope_parameters` keyed by layer type, or the older rope_theta / rope_local_base_freq /
    rope_scaling (the scaling applies to the global layers only)."""
    nested = (hf.get("rope_parameters") or {}).get(layer_type)
    if nested is not None:
        return rope_settings({"rope_parameters": nested})
    if layer_type == "sliding_attention":
        return rope_settings({"rope_theta": hf.get("rope_local_base_freq", 10_000.0)})
    return rope_settings(
        {"rope_theta": hf.get("rope_theta", 1_000_000.0), "rope_scaling": hf.get("rope_scaling")}
    )


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    def __init__(self, config: ModelConfig):
        if config.get("use_bidirectional_attention"):
            raise ValueError(
                "Gemma 3 with use_bidirectional_attention (an encoder) is not supported"
            )
        super().__init__(config)

    def make_layer(self, config: ModelConfig, layer_id: int) -> Gemma3DecoderLayer:
        return Gemma3DecoderLayer(config, layer_id)

    def make_rotaries(self, config: ModelConfig) -> tuple[RotaryEmbedding, RotaryEmbedding]:
        return (
            self.make_rotary(*gemma3_rope(config.hf, "full_attention")),
            self.make_rotary(*gemma3_rope(config.hf, "sliding_attention")),
        )
