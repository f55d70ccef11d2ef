"""The `radixserve` command: `serve` (all five services), one service alone, or `check-env`."""
from __future__ import annotations

import argparse
import importlib
import sys

from services.common.args import add_server_args, args_from_namespace

SERVICES = ("gateway", "tokenizer", "scheduler", "executor", "detokenizer")

_DESCRIPTIONS = {
    "serve": "start all five services as local processes and serve the OpenAI API",
    "gateway": "the OpenAI REST API and the public gRPC API",
    "tokenizer": "text and chat messages to token ids",
    "scheduler": "KV slot pool, radix prefix cache and continuous batching",
    "executor": "the model, its KV tensors and kernels",
    "detokenizer": "incremental token ids to text, stop strings",
    "check-env": "print versions and devices",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description="radixserve LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("serve", *SERVICES):
        p = sub.add_parser(name, help=_DESCRIPTIONS[name], description=_DESCRIPTIONS[name])
        add_server_args(p)
    sub.add_parser("check-env", help=_DESCRIPTIONS["check-env"])
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "check-env":
        from services.common.check_env import print_env
        print_env()
        return 0
    args = args_from_namespace(ns, ns.command)
    if ns.command == "serve":
        from services.launcher import launch
        return launch(args)
    module = importlib.import_module(f"services.{ns.command}.server")
    return module.main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
