"""Phi-3 / Phi-3.5 (mini, medium; Phi-4 with full rotary): Llama layers stored with q, k and v fused in
`qkv_proj` and gate and up fused in `gate_up_proj`, split on loading into our fused parameters (so
that each shards by heads / features under tensor parallelism); LongRoPE scaling (layers/rotary.py).
Rotary over part of each head (partial_rotary_factor < 1, Phi-4-mini) is refused."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from radixserve.executor.layers.rotary import rope_settings
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig):
        partial = rope_settings(config.hf)[1].get(
            "partial_rotary_factor", config.get("partial_rotary_factor", 1.0)
        )
        if partial != 1.0:
            raise ValueError(
                f"Phi3ForCausalLM with partial_rotary_factor {partial} is not supported: "
                "the rotary embedding covers whole heads only"
            )
        super().__init__(config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._unfused(weights))

    def _unfused(self, weights) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint with each fused qkv_proj / gate_up_proj tensor split into Llama's parts."""
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        inter = c.get("intermediate_size")
        fused = {
            ".qkv_proj.": ((".q_proj.", ".k_proj.", ".v_proj."), [q, kv, kv]),
            ".gate_up_proj.": ((".gate_proj.", ".up_proj."), [inter, inter]),
        }
        for name, tensor in weights:
            fragment = next((f for f in fused if f in name), None)
            if fragment is None:
                yield name, tensor
                continue
            parts, sizes = fused[fragment]
            if tensor.shape[0] != sum(sizes):
                raise ValueError(
                    f"checkpoint tensor {name} of shape {tuple(tensor.shape)} does not split into "
                    f"{sizes} rows"
                )
            for part, piece in zip(parts, tensor.split(sizes)):
                yield name.replace(fragment, part), piece
