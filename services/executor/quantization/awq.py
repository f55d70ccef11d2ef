"""AWQ int4 checkpoints (quantization_config quant_method "awq", bits 4, zero_point true, version "gemm").

Tensors per linear layer (K input features, N output features, g the group size):
- qweight int32 [K, N / 8]: eight output features per word, in AWQ's order: nibble i (bits 4 i) holds
  feature 8 c + AWQ_ORDER[i] of word column c.
- qzeros int32 [K / g, N / 8], the same order; scales fp16 [K / g, N]; w = (q - z) * s.
Without a quantized checkpoint (--quantization awq on a plain model) only --load-format dummy works:
random codes with group 128, for timing the kernels at a model's geometry.
"""

from __future__ import annotations

import logging

import torch

from radixserve.executor.quantization.base import new_param, tag
from radixserve.executor.quantization.int4_linear import (
    PACKED,
    Int4Config,
    Int4LinearMethod,
    checkpoint_params,
    nibbles,
)

log = logging.getLogger("radixserve.executor.quantization.awq")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output feature (within 8) that nibble i holds
FEATURE_NIBBLE = tuple(AWQ_ORDER.index(f) for f in range(8))  # the nibble that holds feature f
DUMMY_GROUP = 128


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N / 8] in AWQ order -> uint8 [R, N]."""
    rows = words.shape[0]
    return nibbles(words)[:, :, list(FEATURE_NIBBLE)].reshape(rows, -1)


class AwqLinearMethod(Int4LinearMethod):
    def create_weights(self, layer, in_features, out_features, params_dtype) -> None:
        checkpoint_params(self, layer, out_features)
        qweight = new_param(in_features, out_features // PACKED, dtype=torch.int32)
        layer.register_parameter(
            "qweight", tag(qweight, output_dim=1, input_dim=0, output_div=PACKED)
        )

    def logical(self, layer):
        return unpack_awq(layer.qweight), unpack_awq(layer.qzeros), layer.scales, None


class AwqConfig(Int4Config):
    name = "awq"
    method_class = AwqLinearMethod

    @classmethod
    def from_checkpoint(cls, hf: dict | None) -> "AwqConfig":
        if hf is None:
            log.warning(
                "--quantization awq without an AWQ checkpoint: only --load-format dummy can fill "
                "the weights (random int4, group %d)",
                DUMMY_GROUP,
            )
            return cls(DUMMY_GROUP, checkpoint=False)
        cls.check_bits("awq", hf)
        if not hf.get("zero_point", True):
            raise ValueError("awq: checkpoints without zero points are not supported")
        version = str(hf.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq: version {version!r} is not supported (only 'gemm')")
        return cls(int(hf.get("group_size", hf.get("q_group_size", 128))))
