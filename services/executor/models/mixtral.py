"""Mixtral: Llama attention (no biases) and a top-k sparse MoE block in every layer, routing weights
renormalized over the chosen experts; checkpoint experts are block_sparse_moe.experts.<j>.w1/w3/w2."""

from radixserve.executor.layers.moe import SparseMoeBlock
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.moe_causal_lm import MoeCausalLM, config_num_experts


class MixtralForCausalLM(MoeCausalLM):
    expert_shards = {"w1": "gate", "w3": "up", "w2": "down"}
    checkpoint_renames = {".block_sparse_moe.": ".mlp."}

    def make_mlp(self, config: ModelConfig, layer_id: int) -> SparseMoeBlock:
        return SparseMoeBlock(
            config.get("hidden_size"),
            config_num_experts(config),
            config.get("num_experts_per_tok"),
            config.get("intermediate_size"),
            renormalize=True,
        )
