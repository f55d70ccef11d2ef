"""GGUF weights served as the file stores them: each linear layer (and the token embedding) keeps its
rows of quantized blocks, uint8 [out_features, in_features / block values * block bytes]. On the CPU
the rows of the kernels' types are regrouped 16 at a time for them (gguf_cpu.pack; the same bytes).

The block type is the file's, tensor by tensor, so a parameter's size is only known when its tensor
arrives: `create_weights` registers an empty uint8 `weight` whose loader keeps each loaded tensor (one
per fused shard: q/k/v, gate/up) with its type (`tensor.gguf_qtype`, set by gguf_loader.py). After
loading, shards of one type are concatenated into one tensor; a layer whose shards differ in type
(e.g. Q4_K_M's Q6_K v_proj next to Q4_K q/k) keeps one tensor per run of equal types and
concatenates the outputs. A tied LM head shares the embedding's parameter and so its blocks.

On the CPU the kernels are kernels/gguf_cpu.py's; on CUDA kernels/gguf_triton.py's when present, else
the weight is dequantized per call. Which .gguf runs natively without --quantization: native_config.
"""

from __future__ import annotations

import logging
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.executor.parallel_state import tp_size
from radixserve.executor.quantization.base import LinearMethod, QuantConfig, new_param, tag
from radixserve.kernels import gguf_cpu

log = logging.getLogger("radixserve.executor.quantization.gguf")

# Without --quantization, a .gguf runs natively on the CPU when the AVX2 kernels serve every quantized
# linear layer of the file (gguf_cpu.FUSED_TYPES: Q4_0 / Q4_1 / Q8_0, as the embedded SmolLM2's Q4_1 with
# its Q8_0 embedding, and the K-quants Q4_K / Q5_K / Q6_K, so Q4_K_M and Q6_K files); other files (types
# such as Q5_0, Q2_K, IQ*), other devices (the Triton GGUF kernels beat bf16 only at one row) and CPUs
# without the kernels get the dequantized weights, as `--quantization unquant` asks explicitly.
NATIVE_BY_DEFAULT_DEVICES = ("cpu",)


def _shard_index(shard_id) -> int:
    if shard_id is None:
        return 0
    return "qkv".index(shard_id) if isinstance(shard_id, str) else int(shard_id)


def _gguf_linear_cuda(x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias):
    try:
        from radixserve.kernels.gguf_triton import gguf_linear
    except ImportError:
        w = gguf_cpu.dequantize(qweight, qtype, x.shape[-1]).to(x.dtype)
        return F.linear(x, w, bias)
    return gguf_linear(x, qweight, qtype, bias)


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias=None):
    """x [..., K] @ W^T for W as one run of the file's rows (uint8 blocks or a float tensor)."""
    if qtype in gguf_cpu.FLOAT_TYPES:
        return F.linear(x, qweight.to(x.dtype), bias)
    if x.device.type == "cuda":
        flat = _gguf_linear_cuda(x.reshape(-1, x.shape[-1]), qweight, qtype, bias)
        return flat.reshape(*x.shape[:-1], qweight.shape[0])
    return gguf_cpu.gguf_linear(x, qweight, qtype, bias)


class GgufLinearMethod(LinearMethod):
    name = "gguf"

    def create_weights(self, layer, in_features, out_features, params_dtype):
        if tp_size() != 1:
            raise ValueError("native GGUF weights need --tp-size 1 (use --quantization unquant)")
        weight = tag(new_param(out_features, 0, dtype=torch.uint8), output_dim=0, input_dim=1)
        weight.gguf_pending = {}
        weight.gguf_parts = []  # [(qtype, rows)] in output order, after loading

        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            qtype = getattr(loaded, "gguf_qtype", None)
            if qtype is None:
                raise ValueError("a GGUF layer takes tensors read from a .gguf file (gguf_loader)")
            param.gguf_pending[_shard_index(shard_id)] = (qtype, loaded)

        weight.weight_loader = load
        layer.register_parameter("weight", weight)
        layer.gguf_in_features, layer.gguf_dtype = in_features, params_dtype

    def process_weights_after_loading(self, layer):
        weight = layer.weight
        if (
            not weight.gguf_pending
        ):  # done already (a tied head after its embedding) or never loaded
            return
        parts: list[tuple[int, torch.Tensor]] = []
        for _, (qtype, rows) in sorted(weight.gguf_pending.items()):
            if parts and parts[-1][0] == qtype:
                parts[-1] = (qtype, torch.cat([parts[-1][1], rows]))
            else:
                parts.append((qtype, rows))
        weight.gguf_pending = {}
        parts = [(q, rows.to(weight.device).contiguous()) for q, rows in parts]
        total = sum(rows.shape[0] for _, rows in parts)
        if total != weight.shape[0]:
            raise ValueError(f"GGUF tensors give {total} rows; the layer has {weight.shape[0]}")
        if weight.device.type == "cpu":
            gguf_cpu.load()  # build (first start) or load the kernels now, not at the first request
            parts = [gguf_cpu.pack(q, rows) for q, rows in parts]  # for the kernels
        weight.gguf_parts = parts
        if len(parts) == 1 and parts[0][1].dtype == torch.uint8:
            weight.data = parts[0][
                1
            ]  # the file's rows (packed on the CPU: the same bytes reordered)

    def apply(self, layer, x, bias):
        parts = layer.weight.gguf_parts
        if len(parts) == 1:
            return quantized_linear(x, parts[0][1], parts[0][0], bias)
        y = torch.cat([quantized_linear(x, rows, q) for q, rows in parts], dim=-1)
        return y if bias is None else y + bias

    def embed(self, layer, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of input_ids, dequantized (only the rows looked up)."""
        ((qtype, rows),) = layer.weight.gguf_parts
        flat = input_ids.reshape(-1)
        values = gguf_cpu.dequantize_rows(rows, qtype, layer.gguf_in_features, flat)
        return values.to(layer.gguf_dtype).reshape(*input_ids.shape, -1)

    def weight_bytes(self, layer):
        return sum(r.numel() * r.element_size() for _, r in layer.weight.gguf_parts)


class GgufConfig(QuantConfig):
    """The linear layers and the token embedding of a model read from `gguf_file`."""

    name = "gguf"
    quantizes_lm_head = True  # the file's output.weight blocks, or the tied token_embd ones

    def __init__(self, gguf_file: pathlib.Path):
        self.gguf_file = pathlib.Path(gguf_file)
        self.method = GgufLinearMethod()

    @classmethod
    def from_checkpoint(cls, hf_quant_config):
        file = (hf_quant_config or {}).get("gguf_file")
        if not file:
            raise ValueError("GGUF weights are read from a .gguf file: pass it as --model-path")
        return cls(pathlib.Path(file))

    def linear_method(self):
        return self.method

    def embedding_method(self):
        return self.method

    def weights(self, model_config):
        from radixserve.executor.gguf_loader import iterate_gguf

        return iterate_gguf(self.gguf_file)

    def describe(self):
        return f"gguf ({self.gguf_file.name}, blocks as stored)"


def native_config(
    flag: str | None, folder: pathlib.Path, device: torch.device, load_format: str
) -> GgufConfig | None:
    """The native GGUF config for a model folder converted from a .gguf (model_files), or None: not from
    a .gguf, not asked for (`unquant` or another scheme takes the dequantized weights; unset asks for it
    where default_native says), dummy weights, tensor parallelism, or CUDA without the Triton GGUF
    kernels."""
    from radixserve.common.model_files import gguf_source

    source = gguf_source(folder)
    if source is None or load_format == "dummy" or flag not in (None, "gguf"):
        return None
    if flag is None and not default_native(source, device):
        return None
    if tp_size() != 1:
        log.info("GGUF at --tp-size %d: serving the dequantized weights", tp_size())
        return None
    if device.type == "cuda":
        try:
            import radixserve.kernels.gguf_triton  # noqa: F401
        except ImportError:
            log.info("no Triton GGUF kernels: serving the dequantized weights on CUDA")
            return None
    elif device.type != "cpu":
        return None
    return GgufConfig(source)


def default_native(source: pathlib.Path, device: torch.device) -> bool:
    """Whether a .gguf runs natively without --quantization (see NATIVE_BY_DEFAULT_DEVICES)."""
    from radixserve.executor.gguf_loader import weight_types

    if device.type not in NATIVE_BY_DEFAULT_DEVICES:
        return False
    others = sorted(
        set(weight_types(source)) - set(gguf_cpu.FUSED_TYPES) - set(gguf_cpu.FLOAT_TYPES)
    )
    if others:
        log.info(
            "%s: block types %s have no CPU kernel; serving the dequantized weights "
            "(--quantization gguf serves them natively, dequantized per call)",
            source.name,
            others,
        )
        return False
    if gguf_cpu.load() is None:
        log.info("no GGUF CPU kernels (reason above): serving the dequantized weights")
        return False
    return True
