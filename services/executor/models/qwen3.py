"""Qwen3 (dense: Qwen3-0.6B ... 32B): Qwen3-MoE's attention (an RMSNorm over each q and k head before
the rotary embedding, optional biases) with a dense MLP in every layer."""

from torch import nn

from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaMLP
from radixserve.executor.models.qwen3_moe import Qwen3MoeForCausalLM


class Qwen3ForCausalLM(Qwen3MoeForCausalLM):
    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return LlamaMLP(config.get("hidden_size"), config.get("intermediate_size"), bias=False)
