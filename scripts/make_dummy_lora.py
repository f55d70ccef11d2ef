"""Write random PEFT LoRA adapters for a model's config.json (no weights needed), e.g. to serve a benchmark
with --lora-paths:

    python scripts/make_dummy_lora.py --model-path /models/Llama-3.1-8B-Instruct --out /tmp/loras \
        --count 4 --rank 16 [--targets q_proj v_proj] [--dtype bfloat16]
    radixserve serve --model-path ... --lora-paths $(cat /tmp/loras/lora_paths.txt)

Prints (and writes to OUT/lora_paths.txt) the --lora-paths value NAME=FOLDER ... of the adapters.
"""

import argparse
import json
import pathlib

import torch

from radixserve.executor.lora.adapter import TARGETS
from radixserve.executor.lora.dummy import make_dummy_adapters


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", required=True, help="a folder with config.json, or the file")
    p.add_argument("--out", required=True, help="folder to write lora0, lora1, ... under")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    config_path = pathlib.Path(args.model_path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    config = json.loads(config_path.read_text())
    config = config.get("text_config", config)
    folders = make_dummy_adapters(
        config,
        args.out,
        args.count,
        args.rank,
        targets=tuple(args.targets),
        dtype=getattr(torch, args.dtype),
    )
    value = " ".join(f"{name}={folder}" for name, folder in folders.items())
    (pathlib.Path(args.out) / "lora_paths.txt").write_text(value + "\n")
    print(value)
    return value


if __name__ == "__main__":
    main()
