"""fp8 (e4m3) weights: `--quantization fp8` on a bf16/fp16 checkpoint, or a checkpoint published in fp8.

Schemes (`Fp8Scheme`), all computing with kernels/fp8_gemm.py (`fp8_linear`):
- online (an unquantized checkpoint, `--load-format dummy` too): the layer loads its plain weight, and
  process_weights_after_loading quantizes it per output channel (float32 scale per row) and frees it.
- checkpoint, HF `quant_method: fp8` (DeepSeek-V3, Qwen3-FP8): `weight` float8_e4m3fn [out, in] with
  `weight_scale_inv` float32 [cdiv(out, BN), cdiv(in, BK)] for `weight_block_size: [BN, BK]` (it
  multiplies to dequantize, despite its name); without a block size, a per-tensor `weight_scale` and, for
  `activation_scheme: static`, a per-tensor `input_scale`.
- checkpoint, compressed-tensors fp8 (compressed_tensors.py makes the scheme): `weight_scale` per channel
  [out, 1], per tensor, or per block.

At run time a layer holds `weight` (fp8) and its scale in one of the kernels' two layouts: block, or
rowwise [out] (float32). Per-channel scales are rowwise already; per-tensor scales are expanded to rows,
each fused shard (q/k/v, gate/up: the base's `per_shard` parameters) keeping its own scale, which is
exact: no requantization to a common scale is needed since the kernels scale rows. Static input scales
of fused shards (one activation, several scales) become their max.

Layers named in the checkpoint's ignore list stay unquantized (`QuantConfig.skip`, by HF module name).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.executor.parallel_state import all_reduce_max, tp_size
from radixserve.executor.quantization.base import LinearMethod, QuantConfig, new_param, tag
from radixserve.kernels import fp8_gemm

FP8 = fp8_gemm.FP8
DEFAULT_STATIC_INPUT_SCALE = 16.0 / fp8_gemm.FP8_MAX  # dummy weights: activations up to 16 fit


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    checkpoint: bool = False  # False: quantize a plain weight after loading (online)
    granularity: str = "channel"  # of the weight scale: "channel", "tensor" or "block"
    block: tuple[int, int] | None = None  # (BN, BK) for "block"
    scale_name: str = "weight_scale"  # the checkpoint's name of the weight scale
    static_input: bool = False  # the checkpoint has a per-tensor `input_scale`

    def describe(self) -> str:
        what = f"block {self.block[0]}x{self.block[1]}" if self.block else f"per-{self.granularity}"
        activations = "static" if self.static_input else "dynamic"
        source = "checkpoint" if self.checkpoint else "online"
        return f"{what} weights, {activations} activations, {source}"


def _shard_rows(layer: nn.Module) -> list[int]:
    """This rank's output rows of each fused shard of layer (one entry for a plain layer)."""
    if hasattr(layer, "output_sizes"):  # MergedColumnParallelLinear (gate, up)
        return list(layer.output_sizes)
    if hasattr(layer, "kv_replicas"):  # QKVParallelLinear
        q = layer.num_heads * layer.head_dim
        kv = layer.num_kv_heads * layer.head_dim
        return [q, kv, kv]
    return [layer.out_features]


def _scalar_loader(layer: nn.Module):
    """A loader for per-tensor values: a plain layer takes a checkpoint scalar of any shape (0-d or [1])."""

    def load(param, loaded, shard_id=None):
        if shard_id is None and param.dim() == 1 and loaded.numel() == param.numel():
            loaded = loaded.reshape(param.shape)
        if shard_id is None:
            layer.weight_loader(param, loaded)
        else:
            layer.weight_loader(param, loaded, shard_id)

    return load


class Fp8LinearMethod(LinearMethod):
    name = "fp8"

    def __init__(self, scheme: Fp8Scheme):
        self.scheme = scheme

    # -- parameters
    def create_weights(self, layer, in_features, out_features, params_dtype):
        s = self.scheme
        if not s.checkpoint:
            layer.weight = tag(
                new_param(out_features, in_features, dtype=params_dtype), output_dim=0, input_dim=1
            )
            return
        layer.weight = tag(
            new_param(out_features, in_features, dtype=FP8), output_dim=0, input_dim=1
        )
        shards = len(_shard_rows(layer))
        if s.granularity == "block":
            bn, bk = s.block
            for size in _shard_rows(layer):
                if size % bn:
                    raise ValueError(
                        f"fp8 block {bn}x{bk}: a fused shard (or a tensor-parallel slice) of {size} "
                        f"output features is not a whole number of blocks"
                    )
            if in_features % bk and _splits_input(layer):
                raise ValueError(
                    f"fp8 block {bn}x{bk}: a tensor-parallel slice of {in_features} input features "
                    "is not a whole number of blocks"
                )
            scale = new_param(-(-out_features // bn), -(-in_features // bk), dtype=torch.float32)
            tag(scale, output_dim=0, input_dim=1, output_div=bn, input_div=bk)
        elif s.granularity == "channel":
            scale = tag(
                new_param(out_features, 1, dtype=torch.float32), output_dim=0, input_dim=None
            )
        else:
            scale = tag(
                new_param(shards, dtype=torch.float32),
                output_dim=None,
                input_dim=None,
                per_shard=shards > 1,
            )
            scale.weight_loader = _scalar_loader(layer)
        layer.register_parameter(s.scale_name, scale)
        if s.static_input:
            input_scale = tag(
                new_param(shards, dtype=torch.float32),
                output_dim=None,
                input_dim=None,
                per_shard=shards > 1,
            )
            input_scale.weight_loader = _scalar_loader(layer)
            layer.input_scale = input_scale

    def init_dummy(self, layer, generator, std):
        """Online: the plain weight is drawn as unquantized (False). A checkpoint scheme: the whole (tp=1)
        weight drawn in float32, quantized in this scheme's layout, each rank keeping its part."""
        s = self.scheme
        if not s.checkpoint:
            return False
        device = layer.weight.device
        full = layer.full_shape(layer.weight)
        w = torch.randn(full, generator=generator, dtype=torch.float32, device=device) * std
        scale_param = getattr(layer, s.scale_name)
        if s.granularity == "tensor":
            wq, scale = fp8_gemm.quantize_weight(w.flatten()[None, :])
            wq = wq.view(full)
            scale = scale.expand(layer.full_shape(scale_param)).contiguous()
        else:
            wq, scale = fp8_gemm.quantize_weight(w, s.block)
            scale = scale.reshape(layer.full_shape(scale_param))
        layer.load_full(layer.weight, wq)
        layer.load_full(scale_param, scale)
        if s.static_input:
            layer.input_scale.data.fill_(DEFAULT_STATIC_INPUT_SCALE)
        return True

    def process_weights_after_loading(self, layer):
        s = self.scheme
        if not s.checkpoint:
            w = layer.weight.data
            # A row-parallel rank holds part of each row: its scale comes from the whole row's amax,
            # so that every tensor-parallel size quantizes alike.
            amax = all_reduce_max(w.abs().amax(dim=1).float()) if _splits_input(layer) else None
            wq, scale = fp8_gemm.quantize_weight(w, row_amax=amax)
            del layer.weight  # the plain weight goes now; the fp8 copy replaces it
            layer.weight = nn.Parameter(wq, requires_grad=False)
            layer.weight_scale = nn.Parameter(scale, requires_grad=False)
            return
        scale = getattr(layer, s.scale_name).data
        if s.granularity == "channel":
            scale = scale.reshape(-1)
        elif s.granularity == "tensor":
            rows = torch.tensor(_shard_rows(layer), device=scale.device)
            scale = scale.repeat_interleave(rows)
        delattr(layer, s.scale_name)  # as `weight_scale`: rowwise [out] or the block scale
        layer.weight_scale = nn.Parameter(scale.contiguous(), requires_grad=False)
        if s.static_input:
            layer.input_scale = nn.Parameter(layer.input_scale.data.max(), requires_grad=False)

    # -- forward
    def apply(self, layer, x, bias):
        if x.device.type != "cuda":
            # No fp8 GEMM here: the weight dequantized once, at the first forward, in x's dtype (CPU
            # fp8 -> float conversion runs ~50 ns a value; every step would pay it). Correct, not small.
            w = layer.__dict__.get("_dequantized")
            if w is None or w.dtype != x.dtype:
                w = fp8_gemm.dequantize_weight(
                    layer.weight, layer.weight_scale, self.scheme.block, x.dtype
                )
                layer._dequantized = w
            return F.linear(x, w, bias)
        return fp8_gemm.fp8_linear(
            x,
            layer.weight,
            layer.weight_scale,
            self.scheme.block,
            bias,
            layer.input_scale if self.scheme.static_input else None,
        )


def _splits_input(layer: nn.Module) -> bool:
    from radixserve.executor.layers.linear import RowParallelLinear  # linear imports this package

    return isinstance(layer, RowParallelLinear) and tp_size() > 1


class Fp8Config(QuantConfig):
    """HF `quant_method: fp8`, or online fp8 of an unquantized checkpoint (per-channel)."""

    name = "fp8"

    def __init__(self, scheme: Fp8Scheme, ignore: tuple[str, ...] = ()):
        self.scheme = scheme
        self.ignore = ignore
        self._method = Fp8LinearMethod(scheme)

    @classmethod
    def from_checkpoint(cls, hf_quant_config):
        if hf_quant_config is None:
            return cls(Fp8Scheme())
        activations = str(hf_quant_config.get("activation_scheme", "dynamic")).lower()
        if activations not in ("dynamic", "static"):
            raise ValueError(f"fp8 checkpoint: unknown activation_scheme {activations!r}")
        if str(hf_quant_config.get("fmt", "e4m3")).lower() != "e4m3":
            raise ValueError(f"fp8 checkpoint: format {hf_quant_config['fmt']!r} (only e4m3)")
        block = hf_quant_config.get("weight_block_size")
        ignore = tuple(
            hf_quant_config.get("modules_to_not_convert") or hf_quant_config.get("ignore") or ()
        )
        if block:
            if activations == "static":
                raise ValueError("fp8 checkpoint: block-scaled weights with static activations")
            if len(block) != 2:
                raise ValueError(f"fp8 checkpoint: weight_block_size {block} is not [rows, cols]")
            scheme = Fp8Scheme(True, "block", (int(block[0]), int(block[1])), "weight_scale_inv")
        else:
            scheme = Fp8Scheme(True, "tensor", None, "weight_scale", activations == "static")
        return cls(scheme, ignore)

    def linear_method(self):
        return self._method

    def skip(self, hf_module_name: str) -> bool:
        return skip_module(self.ignore, hf_module_name)

    def describe(self):
        return f"fp8 ({self.scheme.describe()})"


def skip_module(ignore: tuple[str, ...], name: str) -> bool:
    """Whether an ignore / modules_to_not_convert list names module `name` (HF naming): an entry that is
    the name or one of its dotted suffixes / prefixes, or "re:<pattern>" matching it."""
    for entry in ignore:
        if entry.startswith("re:"):
            if re.match(entry[3:], name):
                return True
        elif name == entry or name.endswith("." + entry) or name.startswith(entry + "."):
            return True
    return False
