"""ChatGLM2/3 and GLM-4 in their remote-code layout (architectures ChatGLMModel /
ChatGLMForConditionalGeneration; THUDM/chatglm3-6b, THUDM/glm-4-9b-chat): the GLM-4 decoder of glm.py
(RMSNorm, SwiGLU with gate and up fused, q/k/v biases, half of each head rotating in interleaved
pairs) under other config keys and tensor names: transformer.encoder.layers.N.self_attention.
query_key_value (q, k and v fused; multi-query groups as KV heads), .dense, .mlp.dense_h_to_4h /
dense_4h_to_h, transformer.output_layer. The rotary base is 10000 * rope_ratio."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.glm import GlmForCausalLM

# The remote code's tensor names -> transformers' Llama/GLM names (after the prefix change).
_RENAMES = {
    "transformer.embedding.word_embeddings.": "model.embed_tokens.",
    "transformer.encoder.final_layernorm.": "model.norm.",
    "transformer.output_layer.": "lm_head.",
    ".self_attention.dense.": ".self_attn.o_proj.",
    ".mlp.dense_h_to_4h.": ".mlp.gate_up_proj.",
    ".mlp.dense_4h_to_h.": ".mlp.down_proj.",
}
_QKV = re.compile(r"(.*)\.self_attention\.query_key_value\.(weight|bias)$")


def llama_config_keys(hf: dict) -> dict:
    """The ChatGLM config.json's values under the keys the Llama/GLM model and ModelConfig read."""
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    bias_linear = bool(hf.get("add_bias_linear", False))
    return {
        "num_hidden_layers": hf["num_layers"],
        "vocab_size": hf["padded_vocab_size"],
        "intermediate_size": hf["ffn_hidden_size"],
        "head_dim": hf.get("kv_channels") or hidden // heads,
        "num_key_value_heads": (
            hf["multi_query_group_num"] if hf.get("multi_query_attention") else heads
        ),
        "rms_norm_eps": hf.get("layernorm_epsilon", 1e-5),
        "attention_bias": bias_linear or bool(hf.get("add_qkv_bias", False)),
        "mlp_bias": bias_linear,
        "rope_theta": 10000.0 * hf.get("rope_ratio", 1),
        "partial_rotary_factor": 0.5,
        "tie_word_embeddings": False,
    }


class ChatGLMForCausalLM(GlmForCausalLM):
    def __init__(self, config: ModelConfig):
        hf = config.hf
        if "padded_vocab_size" not in hf or hf.get("position_encoding_2d"):
            raise ValueError(
                "the first ChatGLM-6B (2D position encoding) is not supported; ChatGLM2/3 and"
                " GLM-4 are"
            )
        for key, needed in (
            ("rmsnorm", True),
            ("post_layer_norm", True),
            ("apply_residual_connection_post_layernorm", False),
        ):
            if hf.get(key, needed) != needed:
                raise ValueError(f"ChatGLM with {key}={hf[key]} is not supported")
        for key, value in llama_config_keys(hf).items():
            hf.setdefault(key, value)
        super().__init__(config)

    @staticmethod
    def o_bias(config: ModelConfig) -> bool:
        return bool(config.get("add_bias_linear", False))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self.llama_names(weights))

    def llama_names(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        d, q_rows = cfg.head_dim, cfg.num_heads * cfg.head_dim
        kv_rows = cfg.num_kv_heads * d
        grouped = bool(cfg.get("multi_query_attention"))
        for name, tensor in weights:
            if name.endswith("rotary_pos_emb.inv_freq"):
                continue
            name = name.replace("transformer.encoder.layers.", "model.layers.")
            for old, new in _RENAMES.items():
                name = name.replace(old, new)
            m = _QKV.match(name)
            if m is None:
                yield name, tensor
                continue
            if not grouped:  # each head's [q | k | v] rows together
                shape = tensor.shape
                tensor = tensor.reshape(cfg.num_heads, 3, d, *shape[1:]).transpose(0, 1)
                tensor = tensor.reshape(shape)
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
            for part, value in zip("qkv", (q, k, v)):
                yield f"{m[1]}.self_attn.{part}_proj.{m[2]}", value
