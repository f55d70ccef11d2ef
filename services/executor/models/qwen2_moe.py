"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (q/k/v biases), sparse MoE blocks with a
shared expert scaled by sigmoid(shared_expert_gate(x)); dense MLPs in mlp_only_layers and off the
decoder_sparse_step; routing weights renormalized only with norm_topk_prob."""

from torch import nn

from radixserve.executor.layers.moe import SparseMoeBlock
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaAttention, LlamaMLP
from radixserve.executor.models.moe_causal_lm import (
    MoeCausalLM,
    config_num_experts,
    qwen_layer_is_sparse,
)


def qwen_moe_mlp(config: ModelConfig, layer_id: int) -> nn.Module:
    """The MLP of a Qwen MoE layer: a SparseMoeBlock (with the shared expert when the config has one),
    or a dense MLP of intermediate_size."""
    hidden = config.get("hidden_size")
    if not qwen_layer_is_sparse(config, layer_id):
        return LlamaMLP(hidden, config.get("intermediate_size"), bias=False)
    shared_size = config.get("shared_expert_intermediate_size") or 0
    shared = LlamaMLP(hidden, shared_size, bias=False) if shared_size else None
    return SparseMoeBlock(
        hidden,
        config_num_experts(config),
        config.get("num_experts_per_tok"),
        config.get("moe_intermediate_size"),
        renormalize=bool(config.get("norm_topk_prob", False)),
        shared_expert=shared,
    )


class Qwen2MoeForCausalLM(MoeCausalLM):
    expert_shards = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def make_attention(self, config: ModelConfig, layer_id: int) -> LlamaAttention:
        return LlamaAttention(
            config, layer_id, qkv_bias=bool(config.get("qkv_bias", True)), o_bias=False
        )

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return qwen_moe_mlp(config, layer_id)
