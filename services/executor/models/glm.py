"""GLM-4 in transformers' layout (GlmForCausalLM: THUDM/glm-4-9b-hf and kin): Llama with biases on
q, k and v (none on o), a rotary over the first partial_rotary_factor (0.5) of each head in
interleaved pairs (2j, 2j+1), and gate and up stored as one gate_up_proj tensor."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from radixserve.executor.layers.rotary import RotaryLayout, partial_rotary_dim
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaForCausalLM
from radixserve.executor.models.stablelm import QK_ROWS


class GlmForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.rotary_layout = RotaryLayout(config.head_dim, self.rotary_dim(config), True)

    @staticmethod
    def qkv_bias(config: ModelConfig) -> bool:
        return bool(config.get("attention_bias", True))

    @staticmethod
    def o_bias(config: ModelConfig) -> bool:
        return False

    @staticmethod
    def rotary_dim(config: ModelConfig) -> int:
        return partial_rotary_dim(config.hf, config.head_dim, 0.5)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self.rotary_layout.permute_checkpoint(split_gate_up(weights), QK_ROWS))


def split_gate_up(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """A fused [gate; up] tensor as Llama's gate_proj and up_proj (each then takes its rank's rows)."""
    for name, tensor in weights:
        if ".gate_up_proj." in name:
            gate, up = tensor.chunk(2)
            yield name.replace(".gate_up_proj.", ".gate_proj."), gate
            yield name.replace(".gate_up_proj.", ".up_proj."), up
        else:
            yield name, tensor
