"""What a quantized linear layer's method does, and how its parameters say where they shard.

A LinearMethod owns one kind of quantized weight (fp8, AWQ int4, GGUF blocks, ...). For each linear layer
it registers the parameters the checkpoint fills (`create_weights`), turns them into what its kernel reads
once everything is loaded (`process_weights_after_loading`) and computes y = x W^T + b (`apply`).

The linear layers (layers/linear.py) load every parameter by its tags, set with `tag`:
- output_dim / input_dim: the axis of the parameter along which the layer's output / input features run
  (None: the parameter is not split along that side; e.g. a per-tensor scale).
- output_div / input_div: features per element along that axis (8 for int4 packed eight to an int32, the
  group size for group scales, 128 for 128x128 block scales), so that a fused layer's shard offsets and a
  tensor-parallel rank's slice, given in features, become element offsets.
- per_shard: the parameter holds one entry per fused shard (q, k, v or gate, up) stacked on axis 0,
  e.g. the per-tensor scales of an fp8 checkpoint's separate q/k/v projections.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def tag(
    param: torch.Tensor,
    *,
    output_dim: int | None,
    input_dim: int | None,
    output_div: int = 1,
    input_div: int = 1,
    per_shard: bool = False,
) -> torch.Tensor:
    param.output_dim, param.input_dim = output_dim, input_dim
    param.output_div, param.input_div = output_div, input_div
    param.per_shard = per_shard
    return param


def new_param(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    """An uninitialized frozen parameter on the default device (the one load_model builds on)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class LinearMethod:
    """One quantization scheme's linear layers. One instance serves every layer of a model; per-layer
    state lives on the layer (its parameters and buffers)."""

    name = "unquantized"

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, params_dtype: torch.dtype
    ) -> None:
        """Register this rank's parameters on layer (in_features / out_features are this rank's, after
        tensor-parallel splitting) with `tag`; layer.register_parameter(name, param) each. The layer sets
        each parameter's weight_loader after this returns unless the method set one."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once after the checkpoint (or the dummy values) filled every parameter."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x W^T (+ bias) for x of shape [tokens, in_features], in x's dtype."""
        raise NotImplementedError

    def init_dummy(self, layer: nn.Module, generator: torch.Generator, std: float) -> bool:
        """Fill the layer's parameters with random values valid for this scheme (`--load-format dummy`);
        False leaves it to the plain path (normal(0, std) per float parameter, drawn whole and sliced)."""
        return False

    def embed(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of input_ids (for a method its QuantConfig.embedding_method returns)."""
        raise NotImplementedError

    def weight_bytes(self, layer: nn.Module) -> int:
        """Bytes of weight data a forward reads (for the startup log and /get_model_info)."""
        return sum(p.numel() * p.element_size() for p in layer.parameters() if p is not layer.bias)


class QuantConfig:
    """A model's quantization: made from the --quantization flag and/or the checkpoint's
    `quantization_config` (config.json), it hands each linear layer its method."""

    name = "unquantized"
    # Whether the LM head takes this scheme's linear method too. Published fp8 / AWQ / GPTQ checkpoints
    # keep the head in bf16 (False); a GGUF stores it quantized, or ties it to the quantized embedding.
    quantizes_lm_head = False

    @classmethod
    def from_checkpoint(cls, hf_quant_config: dict | None) -> "QuantConfig":
        """hf_quant_config: the checkpoint's quantization_config, or None for online quantization of an
        unquantized checkpoint (raise ValueError if the scheme cannot do that)."""
        raise NotImplementedError

    def linear_method(self) -> LinearMethod | None:
        """The method for the next linear layer built (None: keep it unquantized)."""
        raise NotImplementedError

    def skip(self, hf_module_name: str) -> bool:
        """Whether the checkpoint left this linear layer unquantized (its ignore / modules_to_not_convert
        list), by the module's HF name (e.g. 'model.layers.0.mlp.down_proj')."""
        return False

    def embedding_method(self) -> LinearMethod | None:
        """The method for the token embedding (None: a plain weight in the model's dtype); its
        create_weights gets (layer, hidden size, vocabulary rows, dtype) and `embed` looks rows up."""
        return None

    def weights(self, model_config) -> Iterator[tuple[str, torch.Tensor]] | None:
        """The checkpoint's tensors when the scheme reads its own file format (GGUF); None: the
        model folder's safetensors."""
        return None

    def describe(self) -> str:
        """One line for the startup log and /get_model_info, e.g. 'fp8 (block 128x128, checkpoint)'."""
        return self.name
