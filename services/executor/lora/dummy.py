"""Random PEFT LoRA adapters for a model config alone (no weights): what benchmarks and tests serve with
--lora-paths when no trained adapter is at hand (scripts/make_dummy_lora.py writes them to folders).

The tensors have the shapes PEFT gives them for the config's q/k/v/o/gate/up/down projections, A and B
small normal values (the delta is of the order of the base layer's output times `scale`).

write_zero_adapter: an adapter of zeros on every layer a LoraManager wrapped, the one the executor's
warm-up (warmup.py) loads to run the LoRA kernels before traffic."""

from __future__ import annotations

import json
import pathlib

import torch

from radixserve.executor.lora.adapter import TARGETS

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def target_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """HF module -> (in, out) features for a Llama-style config.json."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def make_dummy_adapter(
    config: dict,
    folder: str | pathlib.Path,
    rank: int,
    *,
    targets: tuple[str, ...] = tuple(TARGETS),
    seed: int = 0,
    alpha: float | None = None,
    scale: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
) -> pathlib.Path:
    """Write a rank-`rank` PEFT adapter of every target in `targets` for config (a config.json's dict) to
    folder; returns the folder."""
    shapes = target_shapes(config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in targets:
            n_in, n_out = shapes[module]
            a = torch.randn(rank, n_in, generator=g) * n_in**-0.5
            b = torch.randn(n_out, rank, generator=g) * (scale * rank**-0.5)
            tensors[f"{_prefix(layer, module)}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{_prefix(layer, module)}.lora_B.weight"] = b.to(dtype).contiguous()
    base = config.get("_name_or_path", "")
    return _save(folder, tensors, rank, alpha if alpha is not None else rank, targets, base)


def write_zero_adapter(
    layers: dict, targets: frozenset[str], folder: str | pathlib.Path, rank: int, dtype
) -> pathlib.Path:
    """Write a rank-`rank` PEFT adapter of zeros (scaling 1) to folder: A and B of every module in
    targets of every layer in `layers` (a LoraManager's {(layer index, fused name): LoraLinear}), in
    the whole (unsplit) shapes each LoraLinear checks; returns the folder."""
    tensors = {}
    for (layer, fused), lora in sorted(layers.items()):
        for module, (fused_name, shard) in TARGETS.items():
            if fused_name != fused or module not in targets:
                continue
            a = torch.zeros(rank, lora.full_in, dtype=dtype)
            b = torch.zeros(lora.full_sizes[shard], rank, dtype=dtype)
            tensors[f"{_prefix(layer, module)}.lora_A.weight"] = a
            tensors[f"{_prefix(layer, module)}.lora_B.weight"] = b
    return _save(folder, tensors, rank, rank, tuple(sorted(targets)), "")


def _prefix(layer: int, module: str) -> str:
    """The PEFT name of a decoder layer's module."""
    return f"base_model.model.model.layers.{layer}.{'self_attn' if module in _ATTN else 'mlp'}.{module}"


def _save(folder, tensors: dict, rank: int, alpha: float, targets, base: str) -> pathlib.Path:
    """A PEFT adapter folder: tensors (adapter_model.safetensors) and its adapter_config.json."""
    from safetensors.torch import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": base,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return folder


def make_dummy_adapters(
    config: dict, root: str | pathlib.Path, count: int, rank: int, **options
) -> dict[str, pathlib.Path]:
    """count adapters named lora0..lora{count-1} under root (seeds 0..count-1): {name: folder}."""
    root = pathlib.Path(root)
    return {
        f"lora{i}": make_dummy_adapter(config, root / f"lora{i}", rank, seed=i, **options)
        for i in range(count)
    }
