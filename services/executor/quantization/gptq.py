"""GPTQ int4 checkpoints (quantization_config quant_method "gptq", bits 4).

Tensors per linear layer (K input features, N output features, g the group size, -1: one group):
- qweight int32 [K / 8, N]: eight consecutive input rows per word, row 8 r + i at bits 4 i.
- qzeros int32 [K / g, N / 8]: eight consecutive output features per word; checkpoint_format "gptq"
  (v1, the default) stores zero - 1, "gptq_v2" the zero itself. scales fp16 [K / g, N].
- g_idx int32 [K]: the group of each input row. With desc_act (act-order) the groups are not
  contiguous runs of rows; every rank of a row-parallel layer then keeps all the groups' scales and
  zeros and its own rows' g_idx. Without desc_act g_idx is the contiguous runs and is not read.
sym (zero fixed at 8) needs nothing special: the stored zeros say so.
"""

from __future__ import annotations

import functools

import torch

from radixserve.executor.quantization.base import new_param, tag
from radixserve.executor.quantization.int4_linear import (
    PACKED,
    Int4Config,
    Int4LinearMethod,
    checkpoint_params,
    nibbles,
    rank_rows,
)


def _load_shared_g_idx(layer, param, loaded, shard_id=None) -> None:
    """A fused layer (q/k/v, gate/up) holds one g_idx: its projections share their input, so GPTQ gave
    them one act-order; a checkpoint whose shards differ cannot be fused and is refused."""
    before = param.data.clone() if getattr(param, "loaded_shards", 0) else None
    layer.weight_loader(param, loaded, shard_id)
    if before is not None and not torch.equal(before, param.data):
        raise ValueError(
            "gptq act-order: the projections fused into one layer have different g_idx"
        )
    param.loaded_shards = getattr(param, "loaded_shards", 0) + 1


class GptqLinearMethod(Int4LinearMethod):
    def per_row_groups(self) -> bool:
        return self.config.desc_act

    def create_weights(self, layer, in_features, out_features, params_dtype) -> None:
        if in_features % PACKED:
            raise ValueError(f"gptq: {in_features} input features are not a multiple of 8")
        checkpoint_params(self, layer, out_features)
        qweight = new_param(in_features // PACKED, out_features, dtype=torch.int32)
        layer.register_parameter(
            "qweight", tag(qweight, output_dim=1, input_dim=0, input_div=PACKED)
        )
        g_idx = new_param(in_features, dtype=torch.int32)
        layer.register_parameter("g_idx", tag(g_idx, output_dim=None, input_dim=0))
        if self.config.desc_act:
            g_idx.weight_loader = functools.partial(_load_shared_g_idx, layer)

    def logical(self, layer):
        qweight = layer.qweight  # [K / 8, N]
        q = nibbles(qweight).permute(0, 2, 1).reshape(-1, qweight.shape[1])
        z = nibbles(layer.qzeros).reshape(layer.qzeros.shape[0], -1).to(torch.int32)
        if self.config.v1_zeros:
            z = z + 1
        g_idx = layer.g_idx.data if self.config.desc_act else None
        return q, z, layer.scales, g_idx

    def dummy_g_idx(self, layer) -> None:
        rows = rank_rows(layer).to(layer.g_idx.device)
        group = self.group_size(layer) if self.config.group_size == -1 else self.config.group_size
        if not self.config.desc_act:
            rows = rows - rows[0]
        layer.g_idx.data.copy_((rows // group).to(torch.int32))


class GptqConfig(Int4Config):
    name = "gptq"
    method_class = GptqLinearMethod

    def __init__(self, group_size: int, *, desc_act: bool = False, v1_zeros: bool = True, **kw):
        super().__init__(group_size, **kw)
        self.desc_act = desc_act
        self.v1_zeros = v1_zeros

    def extra(self) -> str:
        return ", act-order" if self.desc_act else ""

    @classmethod
    def from_checkpoint(cls, hf: dict | None) -> "GptqConfig":
        if hf is None:
            return cls(128, checkpoint=False)
        cls.check_bits("gptq", hf)
        fmt = str(hf.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq: checkpoint_format {fmt!r} is not supported")
        group = int(hf.get("group_size", 128))
        desc_act = bool(hf.get("desc_act", False))
        return cls(group, desc_act=desc_act and group != -1, v1_zeros=fmt == "gptq")
