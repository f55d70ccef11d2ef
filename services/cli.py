"""The `radixserve` command: `serve` (all five services), one service alone, `bench`, `check-env`,
`check-comm` (collectives across ranks), or `healthcheck SERVICE` (for container and Kubernetes probes)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from radixserve import check_comm
from radixserve.common.args import (
    FlagError,
    add_server_args,
    args_from_namespace,
    check_parallelism,
    load_config_file,
)
from radixserve.common.foreign_flags import warn_ignored
from radixserve.common.grpc_security import check_internal_security
from radixserve.healthcheck import add_arguments as add_healthcheck_arguments

SERVICES = ("gateway", "tokenizer", "scheduler", "executor", "detokenizer")
_FLAG_COMMANDS = ("serve", *SERVICES)  # the commands that take the server flags

_DESCRIPTIONS = {
    "serve": "start all five services as local processes and serve the OpenAI API",
    "gateway": "the OpenAI REST API and the public gRPC API",
    "tokenizer": "text and chat messages to token ids",
    "scheduler": "KV slot pool, radix prefix cache and continuous batching",
    "executor": "the model, its KV tensors and kernels",
    "detokenizer": "incremental token ids to text, stop strings",
    "check-env": "print versions and devices",
    "check-comm": "check all-reduce, all-gather and broadcast across ranks (torchrun or --nproc N) and measure "
    "all-reduce bandwidth; one JSON line per rank, exit 1 on a wrong result",
    "bench": "benchmarks: one-batch (the executor in process) or serving (a running server)",
    "healthcheck": "exit 0 if a running service answers a real call (container and Kubernetes probes), else 1",
}
BENCHMARKS = {"one-batch": "radixserve.bench.one_batch", "serving": "radixserve.bench.serving"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve", description="radixserve LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("serve", *SERVICES):
        p = sub.add_parser(
            name,
            help=_DESCRIPTIONS[name],
            description=_DESCRIPTIONS[name],
            usage=f"radixserve {name} {'[MODEL] ' if name == 'serve' else ''}[flags]",
        )
        if name == "serve":  # `vllm serve MODEL`
            p.add_argument(
                "model_tag", nargs="?", metavar="MODEL", help="the model, as --model-path"
            )
        add_server_args(p)
    sub.add_parser("check-env", help=_DESCRIPTIONS["check-env"])
    comm = sub.add_parser(
        "check-comm",
        help=_DESCRIPTIONS["check-comm"],
        description=check_comm.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check_comm.add_arguments(comm)
    health = sub.add_parser(
        "healthcheck", help=_DESCRIPTIONS["healthcheck"], description=_DESCRIPTIONS["healthcheck"]
    )
    add_healthcheck_arguments(health, SERVICES)
    add_server_args(
        health
    )  # the service's flags and RADIXSERVE_* environment: its addresses, token and TLS
    bench = sub.add_parser("bench", help=_DESCRIPTIONS["bench"], description=_DESCRIPTIONS["bench"])
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="its flags (see radixserve bench NAME --help)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHMARKS:
        # The benchmark parses its own flags (including --help).
        return importlib.import_module(BENCHMARKS[argv[1]]).main(argv[2:]) or 0
    if argv and argv[0] in (*_FLAG_COMMANDS, "healthcheck"):
        argv = [argv[0], *load_config_file(argv[1:])]
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "model_tag", None):
        if ns.model_path not in (None, ns.model_tag):
            parser.error(
                f"the model is given twice: {ns.model_tag!r} and --model-path {ns.model_path!r}"
            )
        ns.model_path = ns.model_tag
    if ns.command == "check-env":
        from radixserve.common.check_env import print_env

        print_env()
        return 0
    if ns.command == "check-comm":
        return check_comm.main(ns, argv[1:])
    try:
        args = args_from_namespace(ns, ns.command)
        if ns.command in SERVICES:
            check_internal_security(args, ns.command)
    except FlagError as e:
        parser.exit(2, f"radixserve {ns.command}: error: {e}\n")
    if ns.command in _FLAG_COMMANDS:
        warn_ignored(ns, f"radixserve {ns.command}")
    if ns.command == "healthcheck":
        from radixserve.healthcheck import main as healthcheck

        return healthcheck(args, ns)
    if ns.command in ("serve", "executor", "scheduler", "gateway"):
        check_parallelism(args)
    if ns.command == "serve":
        from radixserve.launcher import launch

        return launch(args)
    if ns.command == "executor":
        quiet_openmp_threads()
    module = importlib.import_module(f"radixserve.{ns.command}.server")
    return module.main(args) or 0


def quiet_openmp_threads() -> None:
    """Let the executor's OpenMP threads sleep, not spin, between parallel regions (unless the environment
    says otherwise). On a CPU machine that also runs the other services, spinning threads took the cores
    the gateway needed: under a header flood a small chat took up to 5 s instead of 1.8 (docs/security.md).
    It must be set before torch loads its OpenMP runtime, which reads it once."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


if __name__ == "__main__":
    sys.exit(main())
