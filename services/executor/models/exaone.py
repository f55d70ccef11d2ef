"""EXAONE 3.0 / 3.5 (LG AI Research; remote code, `ExaoneForCausalLM`): the Llama architecture under
other names, in the checkpoint (transformer.wte, transformer.h.N.attn.attention.{q,k,v,out}_proj,
mlp.c_fc_0 / c_fc_1 / c_proj for gate / up / down, ln_1, ln_2, transformer.ln_f) and in the config
(num_layers, layer_norm_epsilon, activation_function)."""

from __future__ import annotations

import dataclasses

from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaForCausalLM


class ExaoneForCausalLM(LlamaForCausalLM):
    checkpoint_renames = {
        "transformer.wte.": "model.embed_tokens.",
        "transformer.h.": "model.layers.",
        "transformer.ln_f.": "model.norm.",
        ".attn.attention.out_proj.": ".self_attn.o_proj.",
        ".attn.attention.": ".self_attn.",
        ".mlp.c_fc_0.": ".mlp.gate_proj.",
        ".mlp.c_fc_1.": ".mlp.up_proj.",
        ".mlp.c_proj.": ".mlp.down_proj.",
        ".ln_1.": ".input_layernorm.",
        ".ln_2.": ".post_attention_layernorm.",
    }

    def __init__(self, config: ModelConfig):
        act = config.get("activation_function", "silu")
        if act != "silu":
            raise ValueError(f"ExaoneForCausalLM with activation_function {act!r} is not supported")
        eps = config.get("layer_norm_epsilon", 1e-5)
        super().__init__(dataclasses.replace(config, hf={**config.hf, "rms_norm_eps": eps}))
