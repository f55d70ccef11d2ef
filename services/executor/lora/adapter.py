"""Reading a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) into the
executor's layout: per decoder layer and fused module (qkv_proj, o_proj, gate_up_proj, down_proj), the
A and B of each shard it targets, already sliced for this tensor-parallel rank (see layers.py).

What is refused (LoraError, a 400 at load): a rank above --max-lora-rank, a module outside
--lora-target-modules or not one of q/k/v/o/gate/up/down_proj (embeddings, lm_head, modules_to_save),
DoRA, per-module rank or alpha patterns, layers the base model does not have, and shapes that do not
match it.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from dataclasses import dataclass, field

import torch

from radixserve.common.config import lora_name_problem

# The adapter targets radixserve serves: HF module name -> (our fused module, shard index in it).
TARGETS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
FUSED_SHARDS = {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}

_KEY = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class LoraError(ValueError):
    """An adapter that cannot be served as asked (bad folder, rank, targets, shapes): a client error."""


class LoraNotFound(LoraError):
    """An adapter name that is not loaded."""


class LoraDisabled(LoraError):
    """The executor runs without LoRA (--enable-lora)."""


@dataclass
class ShardPart:
    """One HF module of an adapter in a fused layer: its shard, A [r, in] and B [out, r], this rank's
    slices (A sliced on input for row-parallel layers, B on output for column-parallel ones)."""

    shard: int
    a: torch.Tensor
    b: torch.Tensor


@dataclass
class LoraAdapter:
    """An adapter held in host memory, ready to copy into a GPU slot."""

    name: str
    path: str
    rank: int
    scaling: float  # lora_alpha / rank (/ sqrt(rank) with use_rslora)
    # (layer index, fused module name) -> its shards' parts
    parts: dict[tuple[int, str], list[ShardPart]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(p.a.nbytes + p.b.nbytes for ps in self.parts.values() for p in ps)


def parse_lora_paths(value: str | None) -> list[tuple[str, str]]:
    """--lora-paths "NAME=PATH PATH ..." as (name, path) pairs; a bare PATH is named PATH."""
    pairs = []
    for item in (value or "").split():
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (item, item)
        if (problem := lora_name_problem(name)) is not None:
            raise LoraError(f"--lora-paths {item}: {problem} (name it: NAME=PATH)")
        pairs.append((name, path))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise LoraError(f"--lora-paths names an adapter twice: {names}")
    return pairs


def parse_target_modules(value: str | None) -> frozenset[str]:
    """--lora-target-modules as a set of HF module names (None or "all": every target)."""
    names = (value or "all").split()
    if "all" in names:
        return frozenset(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise LoraError(
            f"--lora-target-modules {unknown} are not LoRA targets here (choose from "
            f"{', '.join(TARGETS)} or all)"
        )
    return frozenset(names)


def read_config(path: pathlib.Path) -> dict:
    try:
        return json.loads((path / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise LoraError(f"{path} is not a PEFT adapter folder (no adapter_config.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise LoraError(f"{path}/adapter_config.json is unreadable: {e}") from None


def adapter_rank(path: str) -> int:
    """The rank r an adapter folder's config declares."""
    return int(read_config(pathlib.Path(path)).get("r", 0))


def _scaling(cfg: dict, rank: int) -> float:
    alpha = float(cfg.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _refuse_unsupported(cfg: dict) -> None:
    if cfg.get("use_dora"):
        raise LoraError("DoRA adapters are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise LoraError(f"adapters with a per-module {key} are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise LoraError("adapters with trained biases are not supported")
    if cfg.get("modules_to_save"):
        raise LoraError("adapters with modules_to_save (fully trained modules) are not supported")


def read_adapter(
    name: str,
    path: str,
    *,
    max_rank: int,
    targets: frozenset[str],
    num_layers: int,
    slicer,
    dtype: torch.dtype,
) -> LoraAdapter:
    """The adapter at path, named name, checked against the limits and the base model; slicer(layer,
    fused module, shard, a, b) -> (a, b) cuts this rank's part and checks shapes (layers.LoraTargets)."""
    from safetensors.torch import load_file

    folder = pathlib.Path(path)
    cfg = read_config(folder)
    _refuse_unsupported(cfg)
    rank = int(cfg.get("r", 0))
    if not 1 <= rank <= max_rank:
        raise LoraError(
            f"adapter {name!r} has rank {rank}; this server takes ranks 1..{max_rank} "
            "(--max-lora-rank)"
        )
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise LoraError(f"{path} has no adapter_model.safetensors")
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except Exception as e:  # a corrupt file: safetensors raises its own error types
        raise LoraError(f"{weights_file} is unreadable: {e}") from None
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise LoraError(f"adapter {name!r}: tensor {key} is not a LoRA A/B of a decoder layer")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in TARGETS:
            raise LoraError(f"adapter {name!r}: {module} is not a LoRA target here")
        if module not in targets:
            raise LoraError(
                f"adapter {name!r} targets {module}, outside --lora-target-modules {sorted(targets)}"
            )
        if not 0 <= layer < num_layers:
            raise LoraError(f"adapter {name!r}: layer {layer} is not in the base model")
        pairs.setdefault((layer, module), {})[ab] = tensor
    adapter = LoraAdapter(name, str(path), rank, _scaling(cfg, rank))
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoraError(f"adapter {name!r}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise LoraError(
                f"adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B "
                f"{tuple(b.shape)}, not rank {rank}"
            )
        fused, shard = TARGETS[module]
        a, b = slicer(layer, fused, shard, a.to(dtype), b.to(dtype))
        adapter.parts.setdefault((layer, fused), []).append(
            ShardPart(shard, a.contiguous(), b.contiguous())
        )
    if not adapter.parts:
        raise LoraError(f"adapter {name!r} has no LoRA weights")
    return adapter
