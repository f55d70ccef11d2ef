"""compressed-tensors checkpoints (`quant_method: compressed-tensors`, llm-compressor's format): the fp8
schemes, run by fp8.py's method.

A config group's `weights` {num_bits 8, type float, strategy channel | tensor | block (block_structure
[BN, BK])} gives `weight` float8_e4m3fn with `weight_scale` ([out, 1], a scalar, or per block; it
multiplies to dequantize); its `input_activations` are dynamic (per token, computed at run time) or
static (an `input_scale` per layer). The `ignore` list names modules left unquantized ("re:" entries are
regular expressions). Other compressed-tensors schemes (int4/int8 packed weights) are refused here.
"""

from __future__ import annotations

from radixserve.executor.quantization.base import QuantConfig
from radixserve.executor.quantization.fp8 import Fp8Config, Fp8Scheme

_STRATEGIES = ("channel", "tensor", "block")


def _fp8_group(hf_quant_config: dict) -> dict:
    groups = list((hf_quant_config.get("config_groups") or {}).values())
    if not groups:
        raise ValueError("compressed-tensors checkpoint without config_groups")
    first = groups[0]
    if any(g.get("weights") != first.get("weights") for g in groups) or any(
        g.get("input_activations") != first.get("input_activations") for g in groups
    ):
        raise ValueError(
            "compressed-tensors: config groups with different schemes are not supported"
        )
    return first


class CompressedTensorsConfig(Fp8Config):
    name = "compressed-tensors"

    @classmethod
    def from_checkpoint(cls, hf_quant_config: dict | None) -> QuantConfig:
        if hf_quant_config is None:
            raise ValueError(
                "--quantization compressed-tensors needs a compressed-tensors checkpoint "
                "(for online fp8 of a bf16 checkpoint use --quantization fp8)"
            )
        group = _fp8_group(hf_quant_config)
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8:
            raise ValueError(
                "compressed-tensors: only fp8 weights (num_bits 8, type float) are supported, "
                f"not {weights.get('num_bits')}-bit {weights.get('type')}"
            )
        strategy = weights.get("strategy")
        if strategy not in _STRATEGIES:
            raise ValueError(
                f"compressed-tensors fp8: weight strategy {strategy!r} is not one of {_STRATEGIES}"
            )
        block = None
        if strategy == "block":
            structure = weights.get("block_structure") or []
            if len(structure) != 2:
                raise ValueError(f"compressed-tensors fp8: block_structure {structure!r}")
            block = (int(structure[0]), int(structure[1]))
        activations = group.get("input_activations")
        static = bool(activations) and not activations.get("dynamic", False)
        if static and activations.get("strategy", "tensor") != "tensor":
            raise ValueError("compressed-tensors fp8: static input scales must be per tensor")
        if static and block:
            raise ValueError("compressed-tensors fp8: block-scaled weights with static activations")
        scheme = Fp8Scheme(True, strategy, block, "weight_scale", static)
        return cls(scheme, tuple(hf_quant_config.get("ignore") or ()))

    def describe(self) -> str:
        return f"compressed-tensors fp8 ({self.scheme.describe()})"
