"""Linear layers that own their weight loading and shard for tensor parallelism.

Column-parallel layers (QKV by heads, gate/up by intermediate features) keep this rank's slice of the
output features and need no communication; row-parallel ones (o_proj, down_proj) keep a slice of the
input features and all-reduce their partial sums (the bias is added once, after). Every layer can also
take its parameters whole, in the tp=1 layout (full_shape / load_full), which is how dummy weights
come out the same at any tp size.

QKVParallelLinear and MergedColumnParallelLinear hold one fused weight, filled from HF's separate
q/k/v and gate/up tensors: one GEMM instead of three (or two) matters for CPU decode speed.
On CPU in bfloat16 the weight is additionally pre-packed for oneDNN, which measures ~1.5x faster
than F.linear for the small-batch GEMMs of decode (and slower for large prefill batches, which
keep using F.linear on the plain weight).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.executor import quantization
from radixserve.executor.parallel_state import all_reduce, tp_rank, tp_size
from radixserve.executor.quantization.base import tag

log = logging.getLogger("radixserve.executor.linear")


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}"
        )
    param.data.copy_(loaded)


def _new_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _rank_slice(loaded: torch.Tensor, dim: int | None, size: int, rank: int) -> torch.Tensor:
    """This rank's `size` elements of loaded along dim (all of it when dim is None)."""
    return loaded if dim is None else loaded.narrow(dim, rank * size, size)


_onednn_ok: bool | None = None
PACKED_MAX_TOKENS = 256  # above this many rows F.linear measured faster than the packed weight
# On CUDA, bf16/fp16 linears of at most 16 rows (decode) run the Triton skinny GEMM (kernels/skinny_gemm.py),
# which streams the weight faster than cuBLAS (8B bs1 step on an H100: 6.06 vs 6.83 ms) and needs no
# split-K reduction. RADIXSERVE_SKINNY_GEMM=0 keeps cuBLAS.
SKINNY_GEMM = os.environ.get("RADIXSERVE_SKINNY_GEMM", "1") != "0"
SKINNY_DEVICES = ("cuda",)  # tests add "cpu" to run it in the Triton interpreter


def _onednn_bf16_available() -> bool:
    global _onednn_ok
    if _onednn_ok is None:
        _onednn_ok = False
        try:
            if (
                torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            ):
                w = torch.randn(64, 32, dtype=torch.bfloat16)
                x = torch.randn(3, 32, dtype=torch.bfloat16)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
                got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                _onednn_ok = torch.allclose(
                    got.float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2
                )
        except (RuntimeError, AttributeError) as e:
            log.info("oneDNN bf16 linear unavailable (%s); using F.linear", e)
    return _onednn_ok


class LinearBase(nn.Module):
    """y = x W^T + b with W of shape [out_features, in_features] (this rank's shard)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # None: a plain weight in the model's dtype; else the quantization scheme's (quantization/).
        self.quant = quantization.linear_method()
        if self.quant is None:
            self.weight = tag(_new_param(out_features, in_features), output_dim=0, input_dim=1)
        else:
            self.quant.create_weights(self, in_features, out_features, torch.get_default_dtype())
        for param in self.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):
                param.weight_loader = self.weight_loader
        if bias:
            self.bias = tag(_new_param(out_features), output_dim=0, input_dim=None)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self._packed_weight: torch.Tensor | None = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded)

    def drop_quantization(self) -> None:
        """Back to a plain weight in the default dtype and device (a layer the checkpoint left
        unquantized; see quantization.unquantize_skipped)."""
        for name, param in list(self.named_parameters(recurse=False)):
            if param is not self.bias:
                delattr(self, name)
        self.quant = None
        self.weight = tag(
            _new_param(self.out_features, self.in_features), output_dim=0, input_dim=1
        )
        self.weight.weight_loader = self.weight_loader

    def full_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        """The shape of param at tp=1 (what load_full takes)."""
        return tuple(param.shape)

    def load_full(self, param: nn.Parameter, full: torch.Tensor) -> None:
        """Fill param with this rank's part of its whole (tp=1 layout) value."""
        self.weight_loader(param, full)

    def process_weights_after_loading(self) -> None:
        if self.quant is not None:
            self.quant.process_weights_after_loading(self)
            return
        w = self.weight
        if w.device.type == "cpu" and w.dtype == torch.bfloat16 and _onednn_bf16_available():
            self._packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.data, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.apply(self, x, bias)
        if (
            SKINNY_GEMM
            and x.device.type in SKINNY_DEVICES
            and x.dtype in (torch.bfloat16, torch.float16)
        ):
            from radixserve.kernels import skinny_gemm

            if x.numel() <= skinny_gemm.M_MAX * x.shape[-1] and self.weight.dtype == x.dtype:
                if torch.compiler.is_compiling():  # opaque to inductor (executor/compiled_ops.py)
                    return torch.ops.radixserve.skinny_gemm(x, self.weight, bias)
                return skinny_gemm.skinny_gemm(x, self.weight, bias)
        if self._packed_weight is not None and x.shape[0] <= PACKED_MAX_TOKENS:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight, bias, "none", [], "")
        return F.linear(x, self.weight, bias)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank holds a slice of W's rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        assert out_features % tp_size() == 0
        super().__init__(in_features, out_features // tp_size(), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        dim = param.output_dim
        size = None if dim is None else param.shape[dim]
        default_weight_loader(param, _rank_slice(loaded, dim, size, tp_rank()))

    def full_shape(self, param):
        return _scaled_shape(param, param.output_dim)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the partial sums are all-reduced, then the bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        assert in_features % tp_size() == 0
        super().__init__(in_features // tp_size(), out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        # The bias (input_dim None) is added once, after the all-reduce: not split.
        dim = param.input_dim
        size = None if dim is None else param.shape[dim]
        default_weight_loader(param, _rank_slice(loaded, dim, size, tp_rank()))

    def full_shape(self, param):
        return _scaled_shape(param, param.input_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return self._linear(x, self.bias)
        y = all_reduce(self._linear(x, None))
        return y if self.bias is None else y + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (e.g. gate and up) stacked in one weight."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = [s // tp_size() for s in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param, loaded, shard_id: int | None = None):
        if shard_id is None:  # the fused tensor whole (a checkpoint that stores it fused)
            super().weight_loader(param, loaded)
            return
        _load_shard(param, loaded, shard_id, self.output_sizes, tp_rank())

    def load_full(self, param, full):
        if param.output_dim is None:
            self.weight_loader(param, full)
            return
        div = param.output_div
        parts = full.split([s * tp_size() // div for s in self.output_sizes], param.output_dim)
        for shard_id, part in enumerate(parts):
            self.weight_loader(param, part, shard_id)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections stacked in one weight: rows [q | k | v] of this rank's heads."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ):
        tp = tp_size()
        if num_heads % tp:
            raise ValueError(
                f"{num_heads} attention heads do not split over tensor-parallel size {tp}"
            )
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(
                f"{num_kv_heads} KV heads neither split over nor replicate to tensor-parallel size {tp}"
            )
        self.num_heads = num_heads // tp
        # With more ranks than kv heads, each kv head is replicated.
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        self.total_num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param, loaded, shard_id: str | None = None):
        if shard_id is None:
            raise ValueError("a fused qkv tensor needs its q/k/v split; load q, k and v separately")
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        rank = tp_rank() if shard_id == "q" else tp_rank() // self.kv_replicas
        _load_shard(param, loaded, "qkv".index(shard_id), [q, kv, kv], rank)

    def full_shape(self, param):
        dim = param.output_dim
        if dim is None:
            return tuple(param.shape)
        rows = (self.num_heads * tp_size() + 2 * self.total_num_kv_heads) * self.head_dim
        shape = list(param.shape)
        shape[dim] = rows // param.output_div
        return tuple(shape)

    def load_full(self, param, full):
        if param.output_dim is None:
            for shard_id, part in zip("qkv", full.unbind(0) if param.per_shard else [full] * 3):
                self.weight_loader(param, part, shard_id)
            return
        q = self.num_heads * tp_size() * self.head_dim
        kv = self.total_num_kv_heads * self.head_dim
        div = param.output_div
        for shard_id, part in zip(
            "qkv", full.split([q // div, kv // div, kv // div], param.output_dim)
        ):
            self.weight_loader(param, part, shard_id)


def _scaled_shape(param: nn.Parameter, dim: int | None) -> tuple[int, ...]:
    """param's shape with axis dim (split over the ranks) at its tp=1 size."""
    shape = list(param.shape)
    if dim is not None:
        shape[dim] *= tp_size()
    return tuple(shape)


def _load_shard(
    param: nn.Parameter, loaded: torch.Tensor, index: int, sizes: list[int], rank: int
) -> None:
    """Load fused shard `index` (of this rank's output sizes `sizes`, in features) of param from the
    checkpoint's whole tensor for that shard."""
    if param.per_shard:  # one entry per shard (e.g. a per-tensor scale)
        default_weight_loader(param.data[index], loaded.reshape(param.data[index].shape))
        return
    dim = param.output_dim
    if dim is None:  # the same value for every shard
        default_weight_loader(param, loaded)
        return
    div = param.output_div
    size, offset = sizes[index] // div, sum(sizes[:index]) // div
    default_weight_loader(
        param.data.narrow(dim, offset, size), loaded.narrow(dim, rank * size, size)
    )
