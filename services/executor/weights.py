"""Filling a model's parameters: from safetensors files, or random (`--load-format dummy`).

Under tensor parallelism each tensor is read whole and the parameter's weight_loader keeps this rank's
slice (see layers/linear.py); dummy weights are drawn whole too and sliced the same way."""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default dtype set to dtype inside the block (parameters are created in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    return files


def iterate_safetensors(folder: pathlib.Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _params_with_owner(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, nn.Module]]:
    """model.named_parameters() (same order, shared ones once) with the module each belongs to."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield f"{module_name}.{name}" if module_name else name, param, module


def init_dummy_weights(model: nn.Module, seed: int | None, std: float = 0.02) -> None:
    """Small random weights (norm scales 1, biases 0) so outputs are finite; reproducible by seed on
    one device type. Drawn on the parameters' device (an 8B model fills in seconds on a GPU).

    Tensor-parallel layers (those with full_shape / load_full) draw their whole tp=1 value and keep
    their rank's slice, so a model has the same dummy weights at every --tp-size."""
    generators: dict[torch.device, torch.Generator] = {}
    quantized: dict[int, bool] = {}  # id(module) -> its quantization scheme filled it
    for name, param, module in _params_with_owner(model):
        device = param.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed or 0)
        gen = generators[device]
        quant = getattr(module, "quant", None)
        if quant is not None and id(module) not in quantized:
            quantized[id(module)] = quant.init_dummy(module, gen, std)
        if quantized.get(id(module)) and param is not getattr(module, "bias", None):
            continue
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        elif hasattr(module, "load_full"):
            shape = module.full_shape(param)
            module.load_full(
                param, torch.randn(shape, generator=gen, dtype=torch.float32, device=device) * std
            )
        else:
            values = (
                torch.randn(param.shape, generator=gen, dtype=torch.float32, device=device) * std
            )
            param.data.copy_(values)
