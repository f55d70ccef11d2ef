"""Qwen2: the Llama architecture with biases on q, k and v (none on o)."""

from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def qkv_bias(config: ModelConfig) -> bool:
        return True

    @staticmethod
    def o_bias(config: ModelConfig) -> bool:
        return False
