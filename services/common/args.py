"""Server flags shared by every service and by `radixserve serve`.

Flag names, aliases and defaults follow SGLang's `launch_server` where SGLang has the flag, and the
everyday flags of `vllm serve` are aliases of the same fields (`--model`, `--max-model-len`,
`--gpu-memory-utilization`, `-tp`, ...). ServerArgs is the composition of the components' config
dataclasses (services/common/config.py), whose fields each declare their flag once: help, choices,
aliases and its section of `--help` live in the field's metadata (`option(...)`), and the parser is
generated from them here. Every service accepts every flag, so one command line can be handed
to all of them; each reads what it needs. SGLang and vLLM flags that are not fields here are either
accepted with a warning or refused with a message (services/common/foreign_flags.py).

Every flag can also come from the environment (containers, Kubernetes ConfigMaps): `RADIXSERVE_` and
the flag's name upper-cased with `_`, e.g. `--model-path` is `RADIXSERVE_MODEL_PATH`, `--tp-size` is
`RADIXSERVE_TP_SIZE`; booleans take 1/true/yes/on or 0/false/no/off (`--no-FLAG` turns one off on
the command line). An empty variable counts as unset. Flags on the command line win over the
environment, which wins over a `--config` YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
from dataclasses import dataclass

from radixserve.common.config import (
    DP_PORT_STRIDE,
    GROUPS,
    AddressConfig,
    GatewayConfig,
    LifecycleConfig,
    ParallelConfig,
    RunnerConfig,
    SchedulerConfig,
    SecurityConfig,
    TelemetryConfig,
    option,
)

ENV_PREFIX = "RADIXSERVE_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def human_int(value: str) -> int:
    """An int, or a number with a suffix as SGLang and vLLM take token counts: k/m/g decimal (25.6k is
    25,600), K/M/G binary and whole (32K is 32,768)."""
    text = str(value).strip()
    if text and text[-1] in _SUFFIXES:
        number, mult = text[:-1], _SUFFIXES[text[-1]]
        try:
            if text[-1].isupper():
                return int(number) * mult
            return int(float(number) * mult)
        except ValueError:
            pass
        raise ValueError(f"invalid int value: {value!r}")
    return int(text)


human_int.__name__ = "int"  # argparse names the type in its error: "invalid int value"

_DEVICES = ("auto", "cpu", "cuda")
_OTHER_DEVICES = ("xpu", "hpu", "npu", "musa", "mps")


def device_name(value: str) -> str:
    """--device: auto | cpu | cuda | cuda:N (SGLang's other devices are refused with a reason)."""
    if value in _DEVICES or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    if value.split(":")[0] in _OTHER_DEVICES:
        raise argparse.ArgumentTypeError(f"{value}: not supported yet (auto, cpu, cuda or cuda:N)")
    raise argparse.ArgumentTypeError(f"{value!r} is not auto, cpu, cuda or cuda:N")


class FlagError(ValueError):
    """Flags that each parse but do not fit together; the CLI exits 2 with the message."""


@dataclass
class ServerArgs(
    SecurityConfig,
    TelemetryConfig,
    LifecycleConfig,
    AddressConfig,
    ParallelConfig,
    GatewayConfig,
    SchedulerConfig,
    RunnerConfig,
):
    """Every component's config in one: the flags of every service and of `radixserve serve`. (Fields collect
    from the last base first: within a section of `--help`, the model's flags come first.)"""

    # Which service this process is (set by the CLI, not a flag).
    service: str = option("serve", "", group="Runtime options", cli=False)

    def to_cli(self) -> list[str]:
        """This config as command-line flags (for starting child processes)."""
        argv: list[str] = []
        for f in flag_fields():
            if f.metadata["secret"]:
                continue
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    argv.append(flag)
                elif _env_value(f.name) is not None:
                    argv.append(
                        "--no-" + flag[2:]
                    )  # the child inherits the environment: the flag wins
            elif value is not None:
                argv += [flag, str(value)]
        return argv


def flag_fields() -> list[dataclasses.Field]:
    """The ServerArgs fields that are flags."""
    return [f for f in dataclasses.fields(ServerArgs) if f.metadata["cli"]]


def supported_choices(f: dataclasses.Field) -> list | None:
    """The values of a choice flag that this version honours (None: not a choice flag)."""
    choices, supported = f.metadata["choices"], f.metadata["supported"]
    return choices if supported is None else supported


def env_name(dest: str) -> str:
    """The environment variable of a flag: --model-path (dest model_path) -> RADIXSERVE_MODEL_PATH."""
    return ENV_PREFIX + dest.upper()


def _env_value(dest: str) -> str | None:
    """The flag's environment variable, stripped; None when unset or empty."""
    raw = os.environ.get(env_name(dest), "").strip()
    return raw or None


def _unsupported_message(f: dataclasses.Field, value) -> str | None:
    """Why a value SGLang accepts is refused here, or None when it is honoured."""
    supported = f.metadata["supported"]
    if supported is None or value is None or value in supported:
        return None
    flag = "--" + f.name.replace("_", "-")
    also = f" (supported here: {', '.join(map(str, supported))})" if supported else ""
    return f"{flag} {value}: {f.metadata['unsupported_hint']}{also}"


def _mapped(f: dataclasses.Field, value):
    """A supported value as this version names it (value_map)."""
    return f.metadata["value_map"].get(value, value)


def _env_default(parser: argparse.ArgumentParser, f: dataclasses.Field, kind=None):
    """The flag's default: its environment variable's value when set, converted like the flag.
    A value the flag would refuse stops the program (exit code 2, as for a bad flag)."""
    raw = _env_value(f.name)
    if raw is None:
        return f.default
    name = env_name(f.name)

    def refuse(why: str):
        parser.exit(
            2, f"{parser.prog.split()[0]}: error: environment variable {name}={raw!r}: {why}\n"
        )

    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        refuse(f"expected one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")
    value = raw
    if kind is not None:
        try:
            value = kind(raw)
        except (ValueError, argparse.ArgumentTypeError) as e:
            refuse(
                str(e)
                if isinstance(e, argparse.ArgumentTypeError)
                else f"not a valid {kind.__name__}"
            )
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        refuse(f"invalid choice (choose from {', '.join(choices)})")
    if (why := _unsupported_message(f, value)) is not None:
        refuse(why)
    return _mapped(f, value)


class _JoinAction(argparse.Action):
    """Stores a flag of several values (option(many=True)) as one space-separated string."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, " ".join(values))


class _FieldAction(argparse.Action):
    """Stores a flag's value: one of several (vLLM's nargs +) only; a value SGLang has but this version
    does not is refused (exit 2, with the flag's hint); other projects' names mapped to this one's."""

    def __init__(self, *args, server_field: dataclasses.Field, **kwargs):
        self.server_field = server_field
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        f = self.server_field
        if f.metadata["one_of_many"]:
            if len(values) != 1:
                parser.exit(
                    2,
                    f"{parser.prog}: error: {option_string} got {len(values)} values: "
                    f"{f.metadata['one_of_many']}\n",
                )
            values = values[0]
        if (why := _unsupported_message(f, values)) is not None:
            parser.exit(2, f"{parser.prog}: error: {why}\n")
        setattr(namespace, self.dest, _mapped(f, values))


ENV_EPILOG = (
    f"Every flag can also be set in the environment as {ENV_PREFIX}<FLAG>: the flag's name upper-cased "
    f"with _ (--model-path: {ENV_PREFIX}MODEL_PATH; booleans 1/true/yes/on or 0/false/no/off). "
    "Flags on the command line win. SGLang's and vLLM's other flags are accepted with a warning where "
    "they cannot change what is served, and refused with a reason otherwise."
)


def _field_type(f: dataclasses.Field):
    ftype = f.type if isinstance(f.type, str) else f.type.__name__
    if f.metadata["tokens"]:
        return human_int
    if f.name == "device":
        return device_name
    if "int" in ftype:
        return int
    if "float" in ftype:
        return float
    return None


def add_server_args(parser: argparse.ArgumentParser, with_foreign: bool = True) -> None:
    """The ServerArgs flags in SGLang's help sections, with defaults taken from RADIXSERVE_* environment
    variables where set; then (with_foreign) SGLang's and vLLM's other flags (foreign_flags.py)."""
    from radixserve.common import foreign_flags

    if parser.epilog is None:
        parser.epilog = ENV_EPILOG
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="a YAML file of flags (`model-path: M`, `tp-size: 2`, "
        "`disable-radix-cache: true`), as SGLang's --config; the command line wins",
    )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in flag_fields():
        group = groups[f.metadata["group"]]
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict = {"dest": f.name, "help": f.metadata["help"]}
        if isinstance(f.default, bool):
            # --flag / --no-flag, so that the command line can turn off what the environment turned on.
            group.add_argument(
                flag,
                *f.metadata["aliases"],
                action=argparse.BooleanOptionalAction,
                default=_env_default(parser, f, bool),
                **kwargs,
            )
            continue
        if f.metadata["many"]:
            kwargs.update(nargs="+", action=_JoinAction, default=_env_default(parser, f))
            group.add_argument(flag, *f.metadata["aliases"], **kwargs)
            continue
        kind = _field_type(f)
        if kind is not None:
            kwargs["type"] = kind
        if f.metadata["choices"] is not None:
            kwargs["choices"] = f.metadata["choices"]
        if (
            f.metadata["supported"] is not None
            or f.metadata["one_of_many"]
            or f.metadata["value_map"]
        ):
            kwargs.update(action=_FieldAction, server_field=f)
            if f.metadata["supported"]:
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["supported"])) + "}"
            if f.metadata["one_of_many"]:
                kwargs["nargs"] = "+"
                kwargs["metavar"] = f.name.upper()
        kwargs["default"] = _env_default(parser, f, kind)
        group.add_argument(flag, *f.metadata["aliases"], **kwargs)
    if with_foreign:
        foreign_flags.add_foreign_flags(parser)


_BOOL_FLAGS = {f.name for f in flag_fields() if isinstance(f.default, bool)}


def load_config_file(argv: list[str]) -> list[str]:
    """argv with the flags of a `--config FILE` (YAML: flag names with or without `--`, `-` or `_`)
    put before the command line's own, so that the command line wins. SGLang's --config."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    rest, path = [], None
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            path = next(it, None)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not path:
        raise SystemExit("error: --config needs a file")
    import yaml

    try:
        doc = yaml.safe_load(pathlib.Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"error: --config {path}: {e}") from e
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise SystemExit(f"error: --config {path}: expected a mapping of flags to values")
    from_file: list[str] = []
    for key, value in doc.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if value is True:
            from_file.append(flag)
        elif value is False:
            if flag[2:].replace("-", "_") in _BOOL_FLAGS:
                from_file.append("--no-" + flag[2:])  # off, even if the environment turned it on
        elif value is None:
            continue
        elif isinstance(value, list):
            from_file += [flag, *map(str, value)]
        else:
            from_file += [flag, str(value)]
    # The service name (argv[0] for the subcommand parsers) stays first.
    return from_file + rest


def normalize(args: ServerArgs) -> ServerArgs:
    """Flags that set others, as SGLang reads them: --enable-ep-moe is --ep-size = --tp-size, --enable-trace
    traces to localhost:4317 unless --otlp-traces-endpoint says where, --quantization gguf loads a GGUF,
    --tokenizer-worker-num / --detokenizer-worker-num spread one address into that many replicas.
    Raises FlagError for flags that parse but do not fit together."""
    changes: dict = {}
    if args.enable_ep_moe and args.ep_size != args.tp_size:
        changes["ep_size"] = args.tp_size
    if args.enable_trace and not args.otlp_traces_endpoint:
        changes["otlp_traces_endpoint"] = "localhost:4317"
    if args.quantization == "gguf" and args.load_format == "auto":
        changes["load_format"] = "gguf"
    if args.kv_cache_dtype in ("bf16", "bfloat16") and args.dtype not in ("bfloat16", "bf16"):
        raise FlagError(
            f"--kv-cache-dtype {args.kv_cache_dtype}: the KV cache is kept in the model's dtype here; "
            "pass --dtype bfloat16 with it, or leave --kv-cache-dtype at auto"
        )
    if args.schedule_conservativeness < 0:
        raise FlagError("--schedule-conservativeness must be at least 0")
    if args.stream_interval < 1:
        raise FlagError("--stream-interval must be at least 1")
    if args.enable_torch_compile and args.torch_compile_max_bs < 1:
        raise FlagError("--torch-compile-max-bs must be at least 1 with --enable-torch-compile")
    check_sampling_defaults(args)
    check_speculation(args)
    for service in ("tokenizer", "detokenizer"):
        count, addrs = getattr(args, f"{service}_worker_num"), getattr(args, f"{service}_addr")
        if count < 1:
            raise FlagError(f"--{service}-worker-num must be at least 1")
        if count > 1:
            try:
                changes[f"{service}_addr"] = ",".join(replica_addrs(addrs, count))
            except ValueError as e:
                raise FlagError(f"--{service}-worker-num {count}: --{service}-addr {e}") from e
    return dataclasses.replace(args, **changes) if changes else args


def check_speculation(args: ServerArgs) -> None:
    """FlagError unless the --speculative-* flags make valid n-gram or EAGLE settings."""
    from radixserve.scheduler.speculation import drafts_trees, speculation_params

    try:
        params = speculation_params(args)
    except ValueError as e:
        raise FlagError(str(e)) from None
    if drafts_trees(params) and args.tp_size > 1:
        raise FlagError(
            "tree drafts (--speculative-eagle-topk or --speculative-ngram-max-bfs-breadth above 1) run on "
            "one shard: use --tp-size 1"
        )


def check_sampling_defaults(args: ServerArgs) -> None:
    """FlagError unless --preferred-sampling-params and --override-generation-config are JSON objects of
    known sampling keys with values in range (sampling.py, with its protobuf stubs, is only imported then)."""
    given = [
        n for n in ("preferred_sampling_params", "override_generation_config") if getattr(args, n)
    ]
    if not given:
        return
    from radixserve.common.sampling import SamplingDefaults, SamplingError

    for name in given:
        try:
            SamplingDefaults.from_json(getattr(args, name), "--" + name.replace("_", "-"))
        except SamplingError as e:
            raise FlagError(str(e)) from None


def check_parallelism(args: ServerArgs) -> None:
    """Refuse (SystemExit) parallelism flags (tensor, expert, data) that do not fit together (`serve`,
    `executor`, `scheduler` and `gateway` check)."""

    def refuse(why: str):
        raise SystemExit(f"error: {why}")

    if args.tp_size < 1 or args.nnodes < 1:
        refuse("--tp-size and --nnodes must be at least 1")
    if args.tp_size % args.nnodes:
        refuse(f"--tp-size {args.tp_size} does not split evenly over --nnodes {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        refuse(f"--node-rank {args.node_rank} is not in 0..{args.nnodes - 1}")
    if args.nnodes > 1 and not args.dist_init_addr:
        refuse(
            "--nnodes > 1 needs --dist-init-addr HOST:PORT (rank 0's rendezvous, reachable from every node)"
        )
    if args.dist_init_addr and not args.dist_init_addr.rpartition(":")[2].isdigit():
        refuse(f"--dist-init-addr {args.dist_init_addr!r} is not HOST:PORT")
    if args.tp_rank is not None:
        per_node = args.tp_size // args.nnodes
        if not args.node_rank * per_node <= args.tp_rank < (args.node_rank + 1) * per_node:
            refuse(f"--tp-rank {args.tp_rank} is not a rank of node {args.node_rank}")
    if args.tp_size > 1 and args.is_embedding:
        refuse("--is-embedding runs on one executor shard: leave --tp-size at 1")
    if args.ep_size < 1 or args.tp_size % args.ep_size:
        refuse(f"--ep-size {args.ep_size} must divide --tp-size {args.tp_size}")
    if args.base_gpu_id < 0:
        refuse("--base-gpu-id must be at least 0")
    check_data_parallelism(args, refuse)


def check_data_parallelism(args: ServerArgs, refuse) -> None:
    """The --dp-size part of check_parallelism: the replicas' addresses, one node, devices chosen per replica."""
    if args.dp_size < 1:
        refuse("--dp-size must be at least 1")
    if args.dp_rank is not None and not 0 <= args.dp_rank < args.dp_size:
        refuse(f"--dp-rank {args.dp_rank} is not in 0..{args.dp_size - 1}")
    for flag in ("scheduler_addr", "executor_addr"):
        try:
            replica_addrs(getattr(args, flag), args.dp_size)
        except ValueError as e:
            refuse(f"--{flag.replace('_', '-')}: {e}")
    if args.dp_size == 1:
        return
    if args.nnodes > 1:
        refuse("--dp-size > 1 runs on one node: leave --nnodes at 1")
    if (
        args.dist_init_addr and args.tp_rank is None
    ):  # shards (--tp-rank) get their executor's rendezvous
        refuse(
            "--dp-size > 1: leave --dist-init-addr unset (each replica's shards meet on a free loopback port)"
        )
    if args.device not in ("auto", "cpu", "cuda"):
        refuse(
            f"--device {args.device} with --dp-size > 1: replica i takes cuda:(base_gpu_id + i * tp_size); "
            "choose the first with --base-gpu-id and pass --device cuda"
        )


def replica_addrs(value: str, dp_size: int) -> list[str]:
    """The host:port of each data-parallel replica from --scheduler-addr / --executor-addr: dp_size
    comma-separated addresses, or one, whose port is replica 0's (replica i: port + i * DP_PORT_STRIDE)."""
    addrs = [addr.strip() for addr in value.split(",") if addr.strip()]
    if len(addrs) == dp_size:
        return addrs
    if len(addrs) != 1:
        raise ValueError(f"{len(addrs)} addresses for {dp_size} replicas: give {dp_size}, or one")
    host, _, port = addrs[0].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{addrs[0]!r} is not HOST:PORT")
    return [f"{host}:{int(port) + i * DP_PORT_STRIDE}" for i in range(dp_size)]


def replica_name(service: str, dp_rank: int | None) -> str:
    """A data-parallel replica's process (and log) name: "scheduler" for replica 0, "scheduler-dp1", ..."""
    return service if not dp_rank else f"{service}-dp{dp_rank}"


def replica_args(args: ServerArgs, index: int) -> ServerArgs:
    """The config of replica `index`'s scheduler and executor: its own addresses, its first GPU, its rank."""
    if args.dp_size == 1:
        return args
    return dataclasses.replace(
        args,
        scheduler_addr=replica_addrs(args.scheduler_addr, args.dp_size)[index],
        executor_addr=replica_addrs(args.executor_addr, args.dp_size)[index],
        base_gpu_id=args.base_gpu_id + index * args.tp_size,
        dp_rank=index,
    )


def args_from_namespace(ns: argparse.Namespace, service: str) -> ServerArgs:
    """The ServerArgs of parsed flags, normalized (see normalize); raises FlagError for flags that do not fit."""
    from radixserve.common.foreign_flags import after_parse

    values = {f.name: getattr(ns, f.name) for f in flag_fields() if hasattr(ns, f.name)}
    args, why = after_parse(ns, normalize(ServerArgs(**values, service=service)))
    if why is not None:
        raise FlagError(why)
    return args
