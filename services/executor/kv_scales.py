"""Per-layer scales of an fp8 KV cache (--kv-cache-dtype fp8_e5m2 | fp8_e4m3).

The pool holds k / k_scale and v / v_scale (saturated to the fp8 range); attention reads them back
times the scale. A layer's scales come from, first to last:
1. --quantization-param-path: the JSON vLLM and SGLang read, {"kv_cache": {"dtype": ...,
   "scaling_factor": {"<tp rank>": {"<layer>": scale}}}}; one scale per layer for both K and V;
2. the checkpoint's tensors `model.layers.N.self_attn.k_scale` / `.v_scale` (or one `.kv_scale` for
   both), as published fp8 checkpoints name them;
3. 1.0.
Scales are plain Python floats fixed at start: kernels take them as scalars, so a captured CUDA graph
replays with them as they were.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

# --kv-cache-dtype values that store fp8 (others keep the model's dtype).
FP8_KV_DTYPES = {"fp8_e5m2": torch.float8_e5m2, "fp8_e4m3": torch.float8_e4m3fn}

_CHECKPOINT_SCALE = re.compile(
    r"(?:^|\.)layers\.(\d+)\.self_attn\.(?:attn\.)?(k_scale|v_scale|kv_scale)$"
)


def kv_cache_torch_dtype(flag: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's dtype for --kv-cache-dtype (auto, bf16: the model's dtype)."""
    return FP8_KV_DTYPES.get(flag or "auto", model_dtype)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_KV_DTYPES.values()


def kv_cache_dtype_name(dtype: torch.dtype) -> str:
    """The pool's dtype as ModelInfo reports it: the flag's name for fp8 (fp8_e5m2), else torch's
    (bfloat16)."""
    for name, fp8 in FP8_KV_DTYPES.items():
        if dtype == fp8:
            return name
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVScales:
    k: tuple[float, ...]  # per layer
    v: tuple[float, ...]
    source: str  # where they came from, for the startup log

    @classmethod
    def ones(cls, num_layers: int) -> "KVScales":
        return cls((1.0,) * num_layers, (1.0,) * num_layers, "none (1.0)")


def split_checkpoint_scales(
    weights: Iterable[tuple[str, torch.Tensor]], found: dict[str, float]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors without its KV-cache scales, which go to found ({name: value}): they
    belong to the KV pool, not to a model parameter."""
    for name, tensor in weights:
        if _CHECKPOINT_SCALE.search(name):
            found[name] = float(tensor.float().reshape(-1)[0])
        else:
            yield name, tensor


def scales_from_checkpoint(found: dict[str, float], num_layers: int) -> KVScales | None:
    """The per-layer scales among a checkpoint's KV-scale tensors (see split_checkpoint_scales); None
    when it has none. A layer without one keeps 1.0."""
    if not found:
        return None
    k, v = [1.0] * num_layers, [1.0] * num_layers
    for name, value in found.items():
        layer_text, kind = _CHECKPOINT_SCALE.search(name).groups()
        layer = int(layer_text)
        if layer >= num_layers:
            raise ValueError(f"checkpoint KV scale {name}: the model has {num_layers} layers")
        if kind in ("k_scale", "kv_scale"):
            k[layer] = value
        if kind in ("v_scale", "kv_scale"):
            v[layer] = value
    return _checked(KVScales(tuple(k), tuple(v), "checkpoint k_scale/v_scale"))


def scales_from_param_file(path: str, num_layers: int, tp_rank: int) -> KVScales:
    """--quantization-param-path: this tensor-parallel rank's per-layer scales (K and V alike)."""
    try:
        with open(path) as f:
            doc = json.load(f)
        table = doc["kv_cache"]["scaling_factor"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(
            f"--quantization-param-path {path}: not a KV-cache scales file "
            f'({{"kv_cache": {{"scaling_factor": {{"<tp rank>": {{"<layer>": scale}}}}}}}}): {e}'
        ) from None
    rank = table.get(str(tp_rank))
    if not isinstance(rank, dict):
        raise ValueError(
            f"--quantization-param-path {path}: no scaling_factor for tp rank {tp_rank}"
        )
    missing = [i for i in range(num_layers) if str(i) not in rank]
    if missing:
        raise ValueError(
            f"--quantization-param-path {path}: no scale for layer(s) {missing[:8]} "
            f"(the model has {num_layers})"
        )
    scales = tuple(float(rank[str(i)]) for i in range(num_layers))
    return _checked(KVScales(scales, scales, f"--quantization-param-path {path}"))


def resolve_kv_scales(
    param_path: str | None, checkpoint: dict[str, float], num_layers: int, tp_rank: int
) -> KVScales:
    """The scales by the precedence of the module docstring."""
    if param_path:
        return scales_from_param_file(param_path, num_layers, tp_rank)
    return scales_from_checkpoint(checkpoint, num_layers) or KVScales.ones(num_layers)


def _checked(scales: KVScales) -> KVScales:
    for value in scales.k + scales.v:
        if not (value > 0 and value != float("inf")):
            raise ValueError(
                f"KV cache scales must be positive and finite; got {value} ({scales.source})"
            )
    return scales
