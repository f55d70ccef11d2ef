"""Filling a model's parameters: from safetensors files, or random (`--load-format dummy`)."""
from __future__ import annotations

import json
import pathlib
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn


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


def init_dummy_weights(model: nn.Module, seed: int | None, std: float = 0.02) -> None:
    """Small random weights (norm scales 1, biases 0) so outputs are finite; reproducible by seed on
    one device type. Drawn on the parameters' device (an 8B model fills in seconds on a GPU)."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        device = param.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed or 0)
        gen = generators[device]
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32, device=device) * std
            param.data.copy_(values)
