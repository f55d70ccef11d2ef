"""InternLM2 / InternLM2.5 (remote code, `InternLM2ForCausalLM`): the Llama architecture with q, k and v
packed in one `attention.wqkv` tensor grouped by KV head ([kv_heads, q_per_kv + 2, head_dim] rows: the
group's q heads, then its k and its v head), split on loading into our q/k/v shards; `bias` in the
config puts biases on wqkv and wo. Dynamic NTK rope scaling changes nothing up to
max_position_embeddings, so it is served as plain rope within that context and refused beyond it."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import torch

from radixserve.executor.layers.rotary import rope_settings
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaForCausalLM


class InternLM2ForCausalLM(LlamaForCausalLM):
    checkpoint_renames = {
        "model.tok_embeddings.": "model.embed_tokens.",
        ".attention.wo.": ".self_attn.o_proj.",
        ".attention_norm.": ".input_layernorm.",
        ".ffn_norm.": ".post_attention_layernorm.",
        ".feed_forward.w1.": ".mlp.gate_proj.",
        ".feed_forward.w3.": ".mlp.up_proj.",
        ".feed_forward.w2.": ".mlp.down_proj.",
    }

    def __init__(self, config: ModelConfig):
        super().__init__(_without_dynamic_ntk(config))

    @staticmethod
    def qkv_bias(config: ModelConfig) -> bool:
        return bool(config.get("bias", True))

    o_bias = qkv_bias

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._unpacked(weights))

    def _unpacked(self, weights) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint with `output` named lm_head and each wqkv tensor split into q, k and v."""
        c = self.config
        groups = c.num_heads // c.num_kv_heads
        for name, tensor in weights:
            if name.startswith("output."):
                yield "lm_head." + name.removeprefix("output."), tensor
            elif ".attention.wqkv." in name:
                rest = tensor.shape[1:]
                packed = tensor.reshape(c.num_kv_heads, groups + 2, c.head_dim, *rest)
                parts = {
                    "q": packed[:, :groups],
                    "k": packed[:, groups],
                    "v": packed[:, groups + 1],
                }
                for proj, part in parts.items():
                    fragment = f".self_attn.{proj}_proj."
                    yield name.replace(".attention.wqkv.", fragment), part.reshape(-1, *rest)
            else:
                yield name, tensor


def _without_dynamic_ntk(config: ModelConfig) -> ModelConfig:
    if rope_settings(config.hf)[1]["rope_type"] != "dynamic":
        return config
    limit = config.get("max_position_embeddings")
    if config.context_length > limit:
        raise ValueError(
            f"InternLM2 with dynamic NTK rope scaling serves contexts up to max_position_embeddings "
            f"({limit}), not {config.context_length}"
        )
    theta, _ = rope_settings(config.hf)
    hf = {k: v for k, v in config.hf.items() if k not in ("rope_scaling", "rope_parameters")}
    return dataclasses.replace(config, hf={**hf, "rope_theta": theta})
