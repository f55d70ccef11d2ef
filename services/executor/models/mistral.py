"""Mistral: the Llama architecture with a sliding window (config `sliding_window`) on every layer."""

from __future__ import annotations

from radixserve.executor.attention.layer import Attention
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaForCausalLM


def effective_sliding_window(config: ModelConfig, window: int | None) -> int | None:
    """The window a layer must apply: None where it cannot cut anything (no window, or one at
    least as long as the context), which keeps such a layer on the full-attention fast paths."""
    if window is None or int(window) >= config.context_length:
        return None
    return int(window)


class MistralForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        window = effective_sliding_window(config, config.get("sliding_window"))
        if window is not None:
            for layer in self.model.layers:
                a = layer.self_attn.attn
                layer.self_attn.attn = Attention(
                    a.layer_id, a.num_heads, a.num_kv_heads, a.head_dim, a.scaling, window
                )
