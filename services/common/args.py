"""Server flags shared by every service and by `radixserve serve`.

Flag names and defaults follow SGLang's `launch_server` where SGLang has the flag. Every service
accepts every flag, so one command line can be handed to all of them; each reads what it needs.

Every flag can also come from the environment (containers, Kubernetes ConfigMaps): `RADIXSERVE_` and
the flag's name upper-cased with `_`, e.g. `--model-path` is `RADIXSERVE_MODEL_PATH`, `--tp-size` is
`RADIXSERVE_TP_SIZE`; booleans take 1/true/yes/on or 0/false/no/off (`--no-FLAG` turns one off on
the command line). An empty variable counts as unset. Flags on the command line win over the
environment.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

ENV_PREFIX = "RADIXSERVE_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

DP_PORT_STRIDE = 100  # replica i of --dp-size listens at the given port + i * DP_PORT_STRIDE

DEFAULT_GRPC_PORTS = {
    "gateway": 30010,
    "tokenizer": 30011,
    "scheduler": 30012,
    "executor": 30013,
    "detokenizer": 30014,
}


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    dtype: str = "auto"
    context_length: int | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    device: str = "auto"
    random_seed: int | None = None
    skip_tokenizer_init: bool = False
    tool_call_parser: str | None = None  # None: chosen from the model (hermes for Qwen, llama3 for Llama)
    is_embedding: bool = False  # serve /v1/embeddings instead of generation

    # HTTP
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = field(default=None, metadata={"secret": True})  # None: every route is open
    file_storage_path: str | None = None  # None: $XDG_DATA_HOME/radixserve/storage

    # Memory and scheduling
    mem_fraction_static: float | None = None
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int = 8192  # -1: off
    enable_mixed_chunk: bool = False
    page_size: int = 1
    schedule_policy: str = "fcfs"  # fcfs | lpm
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False

    # Kernels and graphs (executor)
    attention_backend: str | None = None  # None: triton on CUDA, torch_native on CPU
    cuda_graph_max_bs: int = 256
    disable_cuda_graph: bool = False

    # Parallelism (executor): tp_size shards over nnodes nodes; node k holds ranks k*tp_size/nnodes...
    tp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # HOST:PORT of rank 0's rendezvous; None: a free loopback port (one node)
    tp_rank: int | None = None  # set on the shards an executor starts; None: the node's first shard
    ep_size: int = 1  # expert parallelism: MoE experts split over ep_size groups of the tp_size shards
    base_gpu_id: int = 0  # the executor's first CUDA device (shard k of a node takes base_gpu_id + k)
    # Data parallelism: dp_size scheduler + executor pairs (replicas), each with its own KV and radix cache;
    # the gateway routes each request to one of them (services/gateway/dp_router.py).
    dp_size: int = 1
    load_balance_method: str = "cache_aware"  # round_robin | shortest_queue | cache_aware
    dp_rank: int | None = None  # set by `serve` on the scheduler and executor of replica i (log names)

    # Service addresses (host:port); each service listens on its own and dials the others.
    grpc_host: str = "127.0.0.1"
    gateway_grpc_port: int = DEFAULT_GRPC_PORTS["gateway"]
    tokenizer_addr: str = f"127.0.0.1:{DEFAULT_GRPC_PORTS['tokenizer']}"
    scheduler_addr: str = f"127.0.0.1:{DEFAULT_GRPC_PORTS['scheduler']}"
    executor_addr: str = f"127.0.0.1:{DEFAULT_GRPC_PORTS['executor']}"
    detokenizer_addr: str = f"127.0.0.1:{DEFAULT_GRPC_PORTS['detokenizer']}"

    # Limits and lifecycle
    max_payload_size: int = 32 * 1024 * 1024  # bytes of an HTTP request body; larger ones get 413
    allow_auto_truncate: bool = False  # cut prompts longer than the context instead of rejecting them
    max_queued_requests: int | None = None  # None: no limit; past it new requests get 503
    request_timeout: float | None = None  # seconds a request may take end to end; None: no limit
    shutdown_timeout: float = 30.0  # seconds SIGTERM lets accepted requests finish
    watchdog_timeout: float = 300.0  # seconds a step may run before the executor is declared hung

    # Security between services
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None
    grpc_tls_ca: str | None = None
    # None: $RADIXSERVE_GRPC_AUTH_TOKEN if set, else no token. Secret: never in to_cli (argv shows in `ps`).
    grpc_auth_token: str | None = field(default=None, metadata={"secret": True})

    # Observability
    otlp_traces_endpoint: str | None = None  # None: tracing off
    trace_sample_ratio: float = 1.0
    enable_metrics: bool = False
    log_requests: bool = False

    # Logging
    log_level: str = "info"

    # Which service this process is (set by the CLI, not a flag).
    service: str = field(default="serve", metadata={"cli": False})

    def listen_addr(self, service: str) -> str:
        """The host:port a service binds its gRPC server to."""
        if service == "gateway":
            return f"{self.grpc_host}:{self.gateway_grpc_port}"
        return getattr(self, f"{service}_addr")

    def to_cli(self) -> list[str]:
        """This config as command-line flags (for starting child processes)."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            if f.metadata.get("cli") is False or f.metadata.get("secret"):
                continue
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    argv.append(flag)
                elif _env_value(f.name) is not None:
                    argv.append("--no-" + flag[2:])  # the child inherits the environment: the flag wins
            elif value is not None:
                argv += [flag, str(value)]
        return argv


_HELP = {
    "model_path": "HF model folder, .gguf file, or folder holding one; default: the embedded SmolLM2-135M-Instruct",
    "tokenizer_path": "tokenizer folder (default: the model's)",
    "served_model_name": "model name reported by the API (default: derived from the model path)",
    "chat_template": "a Jinja chat template, or a file holding one, to use instead of the model's",
    "dtype": "auto | bfloat16 | float16 | float32 (auto: the config's dtype)",
    "context_length": "longest prompt + generation (default: the model's max_position_embeddings)",
    "load_format": "auto | safetensors | gguf | dummy (random weights)",
    "device": "auto | cpu | cuda | cuda:N",
    "random_seed": "seed for dummy weights and unseeded sampling",
    "skip_tokenizer_init": "run without a tokenizer (token ids in, token ids out)",
    "tool_call_parser": "format of the model's tool calls: hermes (Qwen, Hermes) | llama3 "
                        "(default: chosen from the model's architecture and name)",
    "is_embedding": "serve embeddings (/v1/embeddings) instead of generation: BERT-family encoders pooled as "
                    "their sentence-transformers config says, decoders on the last token and L2-normalized",
    "host": "HTTP host of the gateway",
    "port": "HTTP port of the gateway",
    "api_key": "require `Authorization: Bearer KEY` on every HTTP route but /health and on the gRPC API",
    "file_storage_path": "folder for /v1/files uploads and /v1/batches state "
                         "(default: $XDG_DATA_HOME/radixserve/storage, i.e. ~/.local/share/radixserve/storage)",
    "mem_fraction_static": "fraction of device memory for weights + KV cache",
    "max_running_requests": "most requests decoded together",
    "max_total_tokens": "KV pool size in tokens (overrides --mem-fraction-static)",
    "max_prefill_tokens": "most prompt tokens run in one prefill step",
    "chunked_prefill_size": "longest prompt chunk run in one step (-1: prefill each prompt whole)",
    "enable_mixed_chunk": "run a prefill chunk and the running requests' decode tokens in one step",
    "page_size": "KV slots per page: allocation and prefix-cache reuse happen in whole pages",
    "attention_backend": "triton | torch_native | flashinfer (default: triton on CUDA, torch_native on CPU)",
    "cuda_graph_max_bs": "largest decode batch replayed from a captured CUDA graph",
    "disable_cuda_graph": "run every step eagerly (no CUDA graphs)",
    "tp_size": "tensor parallel size: the executor runs this many shards (one per GPU; on CPU, all on the host), "
               "split evenly over --nnodes nodes",
    "nnodes": "number of nodes the tensor-parallel shards span",
    "node_rank": "this node's index (0..nnodes-1); nodes other than 0 run only executor shards, which join "
                 "node 0's group",
    "dist_init_addr": "HOST:PORT where rank 0 (node 0) serves the shards' rendezvous; needed with --nnodes > 1 "
                      "(default: a free loopback port)",
    "tp_rank": "this shard's tensor-parallel rank (set by the executor on the shards it starts; "
               "default: the first rank of --node-rank)",
    "ep_size": "expert parallel size for MoE models: the experts are split over this many groups of the "
               "--tp-size shards (each group holds E / ep_size experts; within a group the tp_size / ep_size "
               "shards split each expert's intermediate size); must divide --tp-size",
    "base_gpu_id": "the first CUDA device the executor uses: shard k of a node takes cuda:(base_gpu_id + k) "
                   "(`serve --dp-size N` gives replica i base_gpu_id + i * tp_size)",
    "dp_size": "data parallel size: run this many scheduler + executor replicas, each with its own KV cache and "
               "prefix cache (and --tp-size shards); the gateway routes each request to one of them. Replica i "
               "listens at the i-th address of --scheduler-addr / --executor-addr, or, when one address is given, "
               f"at its port + i * {DP_PORT_STRIDE}",
    "load_balance_method": "how the gateway picks a replica (--dp-size > 1): round_robin | shortest_queue (fewest "
                           "requests in flight) | cache_aware (the replica that most likely caches the prompt's "
                           "prefix, unless the load is too uneven)",
    "dp_rank": "this process's data-parallel replica (set by `serve` on each replica's scheduler and executor)",
    "schedule_policy": "fcfs (arrival order) | lpm (longest cached prefix first)",
    "disable_radix_cache": "do not reuse KV across requests",
    "disable_overlap_schedule": "plan each step only after the previous one returned",
    "grpc_host": "host the gateway's public gRPC API binds to",
    "gateway_grpc_port": "port of the gateway's public gRPC API",
    "tokenizer_addr": "host:port of the tokenizer service",
    "scheduler_addr": "host:port of the scheduler service (with --dp-size N: N comma-separated addresses, or "
                      "one whose port is replica 0's)",
    "executor_addr": "host:port of the executor service (with --dp-size N: as --scheduler-addr)",
    "detokenizer_addr": "host:port of the detokenizer service",
    "log_level": "debug | info | warning | error",
    "max_payload_size": "largest HTTP request body in bytes; a larger one gets 413",
    "allow_auto_truncate": "keep the last tokens of a prompt longer than the context instead of answering 400",
    "max_queued_requests": "most requests waiting to run; past it new requests get 503 with Retry-After",
    "request_timeout": "seconds a request may take end to end before it is aborted (default: no limit)",
    "shutdown_timeout": "on SIGTERM, seconds accepted requests get to finish before the process exits",
    "watchdog_timeout": "seconds one executor step may run before it is reported hung and the executor restarted",
    "grpc_tls_cert": "PEM certificate of this service's gRPC server (TLS between services)",
    "grpc_tls_key": "PEM private key for --grpc-tls-cert",
    "grpc_tls_ca": "PEM CA bundle that signs the other services' certificates (clients verify with it)",
    "grpc_auth_token": "shared secret sent in gRPC metadata between services and required by every service "
                       "(default: $RADIXSERVE_GRPC_AUTH_TOKEN)",
    "otlp_traces_endpoint": "send OpenTelemetry traces to this OTLP gRPC endpoint, e.g. localhost:4317 "
                            "(needs `pip install radixserve[tracing]`; default: tracing off)",
    "trace_sample_ratio": "fraction of requests traced (parent-based: an incoming sampled traceparent is honoured)",
    "enable_metrics": "serve Prometheus metrics at the gateway's /metrics (the scheduler's included)",
    "log_requests": "log each request's id, trace id, parameters and outcome",
}

_CHOICES = {
    "dtype": ["auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float"],
    "load_format": ["auto", "safetensors", "gguf", "dummy"],
    "schedule_policy": ["fcfs", "lpm"],
    "attention_backend": ["triton", "torch_native", "flashinfer"],
    "log_level": ["debug", "info", "warning", "error", "critical"],
    "load_balance_method": ["round_robin", "shortest_queue", "cache_aware"],
}


_ALIASES = {"tp_size": ["--tp"], "dist_init_addr": ["--nccl-init-addr"], "dp_size": ["--dp"], "ep_size": ["--ep"]}


def env_name(dest: str) -> str:
    """The environment variable of a flag: --model-path (dest model_path) -> RADIXSERVE_MODEL_PATH."""
    return ENV_PREFIX + dest.upper()


def _env_value(dest: str) -> str | None:
    """The flag's environment variable, stripped; None when unset or empty."""
    raw = os.environ.get(env_name(dest), "").strip()
    return raw or None


def _env_default(parser: argparse.ArgumentParser, dest: str, default, kind=None, choices=None):
    """The flag's default: its environment variable's value when set, converted like the flag.
    A value the flag would refuse stops the program (exit code 2, as for a bad flag)."""
    raw = _env_value(dest)
    if raw is None:
        return default
    name = env_name(dest)

    def refuse(why: str):
        parser.exit(2, f"{parser.prog.split()[0]}: error: environment variable {name}={raw!r}: {why}\n")

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
        except ValueError:
            refuse(f"not a valid {kind.__name__}")
    if choices is not None and value not in choices:
        refuse(f"invalid choice (choose from {', '.join(choices)})")
    return value


ENV_EPILOG = (f"Every flag can also be set in the environment as {ENV_PREFIX}<FLAG>: the flag's name upper-cased "
              f"with _ (--model-path: {ENV_PREFIX}MODEL_PATH; booleans 1/true/yes/on or 0/false/no/off). "
              "Flags on the command line win.")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The ServerArgs flags, with defaults taken from RADIXSERVE_* environment variables where set."""
    if parser.epilog is None:
        parser.epilog = ENV_EPILOG
    for f in dataclasses.fields(ServerArgs):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kwargs: dict = {"dest": f.name, "help": _HELP.get(f.name, "")}
        if isinstance(default, bool):
            # --flag / --no-flag, so that the command line can turn off what the environment turned on.
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=_env_default(parser, f.name, default, bool), **kwargs)
            continue
        ftype = f.type if isinstance(f.type, str) else f.type.__name__
        if "int" in ftype:
            kwargs["type"] = int
        elif "float" in ftype:
            kwargs["type"] = float
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        kwargs["default"] = _env_default(parser, f.name, default, kwargs.get("type"), kwargs.get("choices"))
        parser.add_argument(flag, *_ALIASES.get(f.name, []), **kwargs)


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
        refuse("--nnodes > 1 needs --dist-init-addr HOST:PORT (rank 0's rendezvous, reachable from every node)")
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
    if args.dist_init_addr and args.tp_rank is None:  # shards (--tp-rank) get their executor's rendezvous
        refuse("--dp-size > 1: leave --dist-init-addr unset (each replica's shards meet on a free loopback port)")
    if args.device not in ("auto", "cpu", "cuda"):
        refuse(f"--device {args.device} with --dp-size > 1: replica i takes cuda:(base_gpu_id + i * tp_size); "
               "choose the first with --base-gpu-id and pass --device cuda")


def replica_addrs(value: str, dp_size: int) -> list[str]:
    """The host:port of each data-parallel replica from --scheduler-addr / --executor-addr: dp_size
    comma-separated addresses, or one, whose port is replica 0's (replica i: port + i * DP_PORT_STRIDE)."""
    addrs = [addr.strip() for addr in value.split(",") if addr.strip()]
    if len(addrs) == dp_size:
        return addrs
    if len(addrs) != 1:
        raise ValueError(f"{len(addrs)} addresses for --dp-size {dp_size}: give {dp_size}, or one")
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
    return dataclasses.replace(args, scheduler_addr=replica_addrs(args.scheduler_addr, args.dp_size)[index],
                               executor_addr=replica_addrs(args.executor_addr, args.dp_size)[index],
                               base_gpu_id=args.base_gpu_id + index * args.tp_size, dp_rank=index)


def args_from_namespace(ns: argparse.Namespace, service: str) -> ServerArgs:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(ServerArgs) if hasattr(ns, f.name)}
    return ServerArgs(**values, service=service)
