"""--attention-backend: which attention implementation the executor runs."""

from __future__ import annotations

import importlib.util
import os

import torch

from radixserve.executor.attention.backend import AttentionBackend

BACKENDS = ("triton", "torch_native", "flashinfer")


def default_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "torch_native"


def create_attention_backend(
    name: str | None, device: torch.device, num_kv_heads: int
) -> AttentionBackend:
    name = name or default_backend(device)
    if name == "torch_native":
        from radixserve.executor.attention.torch_native import TorchNativeAttentionBackend

        return TorchNativeAttentionBackend()
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError(
                "--attention-backend triton needs a CUDA device (or TRITON_INTERPRET=1 for tests); "
                "use torch_native on CPU"
            )
        if importlib.util.find_spec("triton") is None:
            raise ValueError(
                "--attention-backend triton needs the triton package (pip install triton)"
            )
        from radixserve.executor.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(num_kv_heads, device)
    if name == "flashinfer":
        if importlib.util.find_spec("flashinfer") is None:
            raise ValueError(
                "--attention-backend flashinfer needs the flashinfer package, which is not installed; "
                "use triton (the default on CUDA)"
            )
        raise ValueError(
            "--attention-backend flashinfer is not implemented in this version; use triton"
        )
    raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
