"""Server flags shared by every service and by `radixserve serve`.

Flag names, aliases and defaults follow SGLang's `launch_server` where SGLang has the flag, and the
everyday flags of `vllm serve` are aliases of the same fields (`--model`, `--max-model-len`,
`--gpu-memory-utilization`, `-tp`, ...). Each field of ServerArgs declares its flag once: help,
choices, aliases and its section of `--help` live in the field's metadata (`option(...)`), and the
parser is generated from them. Every service accepts every flag, so one command line can be handed
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

# Sections of `--help`, in the order of SGLang's server-arguments reference, then radixserve's own.
GROUPS = (
    "Model and tokenizer",
    "HTTP server",
    "Quantization and data type",
    "Memory and scheduling",
    "Runtime options",
    "Logging",
    "API related",
    "Data parallelism",
    "Multi-node distributed serving",
    "Kernel backends",
    "Expert parallelism",
    "Optimization/debug options",
    "Services and addresses (radixserve)",
    "Limits and lifecycle (radixserve)",
    "Security between services (radixserve)",
)


def option(default, help: str, *, group: str, choices=None, supported=None, unsupported_hint: str = "",
           value_map: dict | None = None, aliases: tuple[str, ...] = (), tokens: bool = False,
           one_of_many: str = "", secret: bool = False, cli: bool = True):
    """A ServerArgs field with its flag's description.

    choices: the values the parser accepts (SGLang's list where it has one); supported: the subset
    honoured here (default: all of them). A value in choices but not supported is refused at start
    (exit 2) with unsupported_hint, so a pasted SGLang command fails with a reason, not a typo error.
    value_map: other projects' names of a supported value (SGLang's `qwen25` tool parser is `hermes`).
    tokens: a token count, also written 32k (32,000) or 32K (32,768) as SGLang and vLLM take it.
    one_of_many: the flag takes several values in vLLM (nargs +); one is honoured, more are refused
    with this reason. secret: never passed on a command line (argv shows in `ps`). cli=False: not a flag."""
    assert group in GROUPS, group
    meta = {"help": help, "group": group, "choices": choices, "supported": supported,
            "unsupported_hint": unsupported_hint, "value_map": value_map or {}, "aliases": tuple(aliases),
            "tokens": tokens, "one_of_many": one_of_many, "secret": secret, "cli": cli}
    return field(default=default, metadata=meta)


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


_DTYPES = ["auto", "half", "float16", "fp16", "bfloat16", "bf16", "float", "float32", "fp32"]
# SGLang's --load-format and --kv-cache-dtype choices; the supported subsets are what this version honours.
_SGLANG_LOAD_FORMATS = ["auto", "pt", "safetensors", "npcache", "dummy", "sharded_state", "gguf", "bitsandbytes",
                        "layered", "remote", "remote_instance", "fastsafetensors", "runai_streamer"]
_SGLANG_KV_CACHE_DTYPES = ["auto", "fp8_e5m2", "fp8_e4m3", "bf16", "bfloat16", "fp4_e2m1", "mxfp8", "nvfp4", "fp8",
                           "fp8_inc", "fp8_ds_mla"]
_SGLANG_ATTENTION_BACKENDS = ["triton", "torch_native", "flex_attention", "flashinfer", "fa3", "fa4", "flashmla",
                              "cutlass_mla", "trtllm_mla", "trtllm_mha", "dual_chunk_flash_attn", "aiter", "wave",
                              "intel_amx", "ascend", "intel_xpu"]


@dataclass
class ServerArgs:
    # -- Model and tokenizer
    model_path: str | None = option(
        None, "HF model folder, hub id (org/name, resolved through the HF cache; --revision, --download-dir), "
              ".gguf file, or folder holding one; default: the embedded SmolLM2-135M-Instruct",
        group="Model and tokenizer", aliases=("--model",))
    tokenizer_path: str | None = option(None, "tokenizer folder or hub id (default: the model's)",
                                        group="Model and tokenizer", aliases=("--tokenizer",))
    revision: str | None = option(None, "for a hub id: the branch, tag or commit to load (default: main)",
                                  group="Model and tokenizer")
    download_dir: str | None = option(
        None, "for a hub id: the cache folder to read and download into (default: the hub's cache, $HF_HOME)",
        group="Model and tokenizer")
    load_format: str = option(
        "auto", "auto | safetensors | gguf | dummy (random weights)", group="Model and tokenizer",
        choices=_SGLANG_LOAD_FORMATS, supported=["auto", "safetensors", "gguf", "dummy"],
        unsupported_hint="not supported yet")
    context_length: int | None = option(
        None, "longest prompt + generation (default: the model's max_position_embeddings)",
        group="Model and tokenizer", aliases=("--max-model-len",), tokens=True)
    is_embedding: bool = option(
        False, "serve embeddings (/v1/embeddings) instead of generation: BERT-family encoders pooled as their "
               "sentence-transformers config says, decoders on the last token and L2-normalized",
        group="Model and tokenizer")
    skip_tokenizer_init: bool = option(False, "run without a tokenizer (token ids in, token ids out)",
                                       group="Model and tokenizer")

    # -- HTTP server
    host: str = option("127.0.0.1", "HTTP host of the gateway", group="HTTP server")
    port: int = option(30000, "HTTP port of the gateway", group="HTTP server")

    # -- Quantization and data type
    dtype: str = option("auto", "auto | bfloat16 | float16 | float32 (auto: the config's dtype)",
                        group="Quantization and data type", choices=_DTYPES)
    quantization: str | None = option(
        None, "gguf: a .gguf model (dequantized at load); other quantized weights are not supported yet",
        group="Quantization and data type", aliases=("-q",),
        choices=["awq", "fp8", "mxfp8", "gptq", "marlin", "gptq_marlin", "awq_marlin", "bitsandbytes", "gguf",
                 "modelopt", "modelopt_fp8", "modelopt_fp4", "petit_nvfp4", "w8a8_int8", "w8a8_fp8", "moe_wna16",
                 "qoq", "w4afp8", "mxfp4", "auto-round", "compressed-tensors", "modelslim", "quark", "unquant",
                 "fp8_inc", "experts_int8", "fbgemm_fp8", "torchao", "gptq_marlin_24", "awq_marlin_24"],
        supported=["gguf", "unquant"], value_map={"unquant": None},
        unsupported_hint="quantized weights are not supported yet: serve a bf16/fp16 checkpoint")
    kv_cache_dtype: str = option(
        "auto", "KV cache dtype; auto: the model's dtype", group="Quantization and data type",
        choices=_SGLANG_KV_CACHE_DTYPES, supported=["auto", "bf16", "bfloat16"],
        unsupported_hint="a quantized KV cache is not supported yet; leave it at auto (the model's dtype)")

    # -- Memory and scheduling
    mem_fraction_static: float | None = option(
        None, "fraction of device memory for weights + KV cache (default 0.85 on CUDA)",
        group="Memory and scheduling", aliases=("--gpu-memory-utilization",))
    max_running_requests: int | None = option(None, "most requests decoded together", group="Memory and scheduling",
                                              aliases=("--max-num-seqs",))
    max_queued_requests: int | None = option(
        None, "most requests waiting to run; past it new requests get 503 with Retry-After (default: no limit)",
        group="Memory and scheduling")
    max_total_tokens: int | None = option(None, "KV pool size in tokens (overrides --mem-fraction-static)",
                                          group="Memory and scheduling", tokens=True)
    chunked_prefill_size: int = option(8192, "longest prompt chunk run in one step (-1: prefill each prompt whole)",
                                       group="Memory and scheduling", tokens=True)
    max_prefill_tokens: int = option(16384, "most prompt tokens run in one prefill step", group="Memory and scheduling",
                                     tokens=True)
    schedule_policy: str = option(
        "fcfs", "fcfs (arrival order) | lpm (longest cached prefix first)", group="Memory and scheduling",
        choices=["fcfs", "lpm", "random", "dfs-weight", "lof", "priority", "routing-key"], supported=["fcfs", "lpm"],
        unsupported_hint="not supported yet")
    schedule_conservativeness: float = option(
        1.0, "how much KV a running request is assumed to still need when admitting new ones (the initial new-token "
             "ratio is min(0.7 x this, 1)): larger admits fewer requests and retracts less",
        group="Memory and scheduling")
    enable_mixed_chunk: bool = option(False, "run a prefill chunk and the running requests' decode tokens in one step",
                                      group="Memory and scheduling")
    page_size: int = option(1, "KV slots per page: allocation and prefix-cache reuse happen in whole pages",
                            group="Memory and scheduling", aliases=("--block-size",))

    # -- Runtime options
    device: str = option("auto", "auto | cpu | cuda | cuda:N", group="Runtime options")
    skip_server_warmup: bool = option(
        False, "say ready without warming up (the first requests then pay for kernel compilation and autotuning)",
        group="Runtime options")
    tp_size: int = option(
        1, "tensor parallel size: the executor runs this many shards (one per GPU; on CPU, all on the host), "
           "split evenly over --nnodes nodes", group="Runtime options",
        aliases=("--tensor-parallel-size", "--tp", "-tp"))
    random_seed: int | None = option(None, "seed for dummy weights and unseeded sampling", group="Runtime options",
                                     aliases=("--seed",))
    watchdog_timeout: float = option(
        300.0, "seconds one executor step may run before it is reported hung and the executor restarted",
        group="Runtime options")
    base_gpu_id: int = option(
        0, "the first CUDA device the executor uses: shard k of a node takes cuda:(base_gpu_id + k) "
           "(`serve --dp-size N` gives replica i base_gpu_id + i * tp_size)", group="Runtime options")
    tp_rank: int | None = option(
        None, "this shard's tensor-parallel rank (set by the executor on the shards it starts; "
              "default: the first rank of --node-rank)", group="Runtime options")

    # -- Logging
    log_level: str = option("info", "debug | info | warning | error", group="Logging",
                            choices=["debug", "info", "warning", "error", "critical"])
    log_requests: bool = option(False, "log each request's id, trace id, parameters and outcome", group="Logging")
    enable_metrics: bool = option(False, "serve Prometheus metrics at the gateway's /metrics (the scheduler's included)",
                                  group="Logging")
    enable_trace: bool = option(False, "send OpenTelemetry traces (to --otlp-traces-endpoint, default localhost:4317)",
                                group="Logging")
    otlp_traces_endpoint: str | None = option(
        None, "send OpenTelemetry traces to this OTLP gRPC endpoint, e.g. localhost:4317 "
              "(needs `pip install radixserve[tracing]`; default: tracing off)", group="Logging")
    trace_sample_ratio: float = option(
        1.0, "fraction of requests traced (parent-based: an incoming sampled traceparent is honoured)", group="Logging")

    # -- API related
    api_key: str | None = option(
        None, "require `Authorization: Bearer KEY` on every HTTP route but /health and on the gRPC API",
        group="API related", secret=True, one_of_many="several API keys are not supported yet")
    served_model_name: str | None = option(
        None, "model name reported by the API (default: the hub id, or derived from the model path)",
        group="API related", one_of_many="several served model names are not supported yet")
    chat_template: str | None = option(
        None, "SGLang's named template (chatml, llama-3-instruct, ...), a file holding a Jinja chat template, or "
              "the template itself, to use instead of the model's", group="API related")
    tool_call_parser: str | None = option(
        None, "format of the model's tool calls: hermes (Qwen, Hermes; SGLang's qwen25) | llama3 (default or auto: "
              "chosen from the model's architecture and name)", group="API related",
        supported=["hermes", "qwen", "qwen25", "llama3", "llama3_json", "auto"],
        value_map={"llama3_json": "llama3", "qwen": "hermes", "qwen25": "hermes", "auto": None}, unsupported_hint="this tool call format is not supported yet")
    file_storage_path: str | None = option(
        None, "folder for /v1/files uploads and /v1/batches state "
              "(default: $XDG_DATA_HOME/radixserve/storage, i.e. ~/.local/share/radixserve/storage)",
        group="API related")

    # -- Data parallelism: dp_size scheduler + executor pairs (replicas), each with its own KV and radix
    # cache; the gateway routes each request to one of them (services/gateway/pipeline/dp_router.py).
    dp_size: int = option(
        1, "data parallel size: run this many scheduler + executor replicas, each with its own KV cache and prefix "
           "cache (and --tp-size shards); the gateway routes each request to one of them. Replica i listens at the "
           "i-th address of --scheduler-addr / --executor-addr, or, when one address is given, at its port + "
           f"i * {DP_PORT_STRIDE}", group="Data parallelism", aliases=("--data-parallel-size", "--dp", "-dp"))
    load_balance_method: str = option(
        "cache_aware", "how the gateway picks a replica (--dp-size > 1): round_robin | shortest_queue (fewest "
                       "requests in flight) | cache_aware (the replica that most likely caches the prompt's prefix, "
                       "unless the load is too uneven); SGLang's auto is round_robin, total_requests shortest_queue",
        group="Data parallelism",
        choices=["round_robin", "shortest_queue", "cache_aware", "auto", "total_requests", "total_tokens",
                 "minimum_tokens", "follow_bootstrap_room"],
        supported=["round_robin", "shortest_queue", "cache_aware", "auto", "total_requests"],
        value_map={"auto": "round_robin", "total_requests": "shortest_queue"}, unsupported_hint="not supported yet")
    dp_rank: int | None = option(
        None, "this process's data-parallel replica (set by `serve` on each replica's scheduler and executor)",
        group="Data parallelism")

    # -- Multi-node distributed serving: tp_size shards over nnodes nodes; node k holds ranks k*tp_size/nnodes...
    dist_init_addr: str | None = option(
        None, "HOST:PORT where rank 0 (node 0) serves the shards' rendezvous; needed with --nnodes > 1 "
              "(default: a free loopback port)", group="Multi-node distributed serving", aliases=("--nccl-init-addr",))
    nnodes: int = option(1, "number of nodes the tensor-parallel shards span", group="Multi-node distributed serving")
    node_rank: int = option(
        0, "this node's index (0..nnodes-1); nodes other than 0 run only executor shards, which join node 0's group",
        group="Multi-node distributed serving")

    # -- Kernel backends
    attention_backend: str | None = option(
        None, "triton | torch_native (default: triton on CUDA, torch_native on CPU)", group="Kernel backends",
        choices=_SGLANG_ATTENTION_BACKENDS, supported=["triton", "torch_native"],
        unsupported_hint="not available here; use triton (CUDA) or torch_native")

    # -- Expert parallelism
    ep_size: int = option(
        1, "expert parallel size for MoE models: the experts are split over this many groups of the --tp-size shards "
           "(each group holds E / ep_size experts; within a group the tp_size / ep_size shards split each expert's "
           "intermediate size); must divide --tp-size", group="Expert parallelism",
        aliases=("--expert-parallel-size", "--ep"))
    enable_ep_moe: bool = option(False, "expert parallelism over all tensor-parallel shards (--ep-size = --tp-size)",
                                 group="Expert parallelism")

    # -- Optimization/debug options
    disable_radix_cache: bool = option(False, "do not reuse KV across requests", group="Optimization/debug options")
    cuda_graph_max_bs: int = option(256, "largest decode batch replayed from a captured CUDA graph",
                                    group="Optimization/debug options", aliases=("--cuda-graph-max-bs-decode",))
    disable_cuda_graph: bool = option(False, "run every step eagerly (no CUDA graphs)",
                                      group="Optimization/debug options")
    disable_overlap_schedule: bool = option(False, "plan each step only after the previous one returned",
                                            group="Optimization/debug options")

    # -- Services and addresses: each service listens on its own and dials the others.
    grpc_host: str = option("127.0.0.1", "host the gateway's public gRPC API binds to",
                            group="Services and addresses (radixserve)")
    gateway_grpc_port: int = option(DEFAULT_GRPC_PORTS["gateway"], "port of the gateway's public gRPC API",
                                    group="Services and addresses (radixserve)")
    tokenizer_worker_num: int = option(
        1, "tokenizer processes: with one --tokenizer-addr, replica i listens at its port + i * 100",
        group="Services and addresses (radixserve)")
    detokenizer_worker_num: int = option(
        1, "detokenizer processes: with one --detokenizer-addr, replica i listens at its port + i * 100",
        group="Services and addresses (radixserve)")
    tokenizer_addr: str = option(f"127.0.0.1:{DEFAULT_GRPC_PORTS['tokenizer']}",
                                 "host:port of the tokenizer service (comma-separated: replicas)",
                                 group="Services and addresses (radixserve)")
    scheduler_addr: str = option(
        f"127.0.0.1:{DEFAULT_GRPC_PORTS['scheduler']}",
        "host:port of the scheduler service (with --dp-size N: N comma-separated addresses, or one whose port is "
        "replica 0's)", group="Services and addresses (radixserve)")
    executor_addr: str = option(f"127.0.0.1:{DEFAULT_GRPC_PORTS['executor']}",
                                "host:port of the executor service (with --dp-size N: as --scheduler-addr)",
                                group="Services and addresses (radixserve)")
    detokenizer_addr: str = option(f"127.0.0.1:{DEFAULT_GRPC_PORTS['detokenizer']}",
                                   "host:port of the detokenizer service (comma-separated: replicas)",
                                   group="Services and addresses (radixserve)")

    # -- Limits and lifecycle
    max_payload_size: int = option(32 * 1024 * 1024, "largest HTTP request body in bytes; a larger one gets 413",
                                   group="Limits and lifecycle (radixserve)")
    allow_auto_truncate: bool = option(
        False, "keep the last tokens of a prompt longer than the context instead of answering 400",
        group="Limits and lifecycle (radixserve)")
    request_timeout: float | None = option(
        None, "seconds a request may take end to end before it is aborted (default: no limit)",
        group="Limits and lifecycle (radixserve)")
    shutdown_timeout: float = option(30.0, "on SIGTERM, seconds accepted requests get to finish before the process "
                                           "exits", group="Limits and lifecycle (radixserve)")
    max_request_sequences: int = option(
        256, "most sequences one request may ask for (prompts x n; also counted against --max-queued-requests); "
             "more is a 400", group="Limits and lifecycle (radixserve)")
    grammar_compile_timeout: float = option(
        10.0, "seconds a structured-output constraint (json_schema, regex, ebnf) may take to compile; longer is a 400",
        group="Limits and lifecycle (radixserve)")
    grammar_max_concurrent_compiles: int = option(
        2, "constraints compiled at once (the others wait, within --grammar-compile-timeout)",
        group="Limits and lifecycle (radixserve)")
    grammar_max_bytes: int = option(
        131072, "largest constraint (schema, regex or grammar text) in bytes; a larger one is a 400 before compiling",
        group="Limits and lifecycle (radixserve)")
    http_max_header_bytes: int = option(
        65536, "largest HTTP request head (request line + headers) in bytes; larger gets 431 and the connection closes",
        group="Limits and lifecycle (radixserve)")
    http_max_headers: int = option(100, "most HTTP request headers; more gets 431",
                                   group="Limits and lifecycle (radixserve)")
    http_header_timeout: float = option(
        10.0, "seconds a client may take to send a request's headers; then the connection closes",
        group="Limits and lifecycle (radixserve)")
    http_keep_alive_timeout: float = option(
        5.0, "seconds an idle keep-alive HTTP connection stays open", group="Limits and lifecycle (radixserve)")
    http_max_connections: int | None = option(
        None, "most open HTTP connections; past it new ones get 503 and close (default: from the open-file limit)",
        group="Limits and lifecycle (radixserve)")

    # -- Security between services
    grpc_tls_cert: str | None = option(None, "PEM certificate of this service's gRPC server (TLS between services)",
                                       group="Security between services (radixserve)")
    grpc_tls_key: str | None = option(None, "PEM private key for --grpc-tls-cert",
                                      group="Security between services (radixserve)")
    grpc_tls_ca: str | None = option(None, "PEM CA bundle that signs the other services' certificates (clients "
                                           "verify with it)", group="Security between services (radixserve)")
    insecure_internal: bool = option(
        False, "let a service started alone listen on a non-loopback address without --grpc-auth-token or TLS",
        group="Security between services (radixserve)")
    # None: $RADIXSERVE_GRPC_AUTH_TOKEN if set, else none (`serve` then makes one up for its services).
    grpc_auth_token: str | None = option(
        None, "shared secret sent in gRPC metadata between services and required by every service "
              "(default: $RADIXSERVE_GRPC_AUTH_TOKEN)", group="Security between services (radixserve)", secret=True)

    # Which service this process is (set by the CLI, not a flag).
    service: str = option("serve", "", group="Runtime options", cli=False)

    def listen_addr(self, service: str) -> str:
        """The host:port a service binds its gRPC server to."""
        if service == "gateway":
            return f"{self.grpc_host}:{self.gateway_grpc_port}"
        return getattr(self, f"{service}_addr")

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
                    argv.append("--no-" + flag[2:])  # the child inherits the environment: the flag wins
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
        except (ValueError, argparse.ArgumentTypeError) as e:
            refuse(str(e) if isinstance(e, argparse.ArgumentTypeError) else f"not a valid {kind.__name__}")
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        refuse(f"invalid choice (choose from {', '.join(choices)})")
    if (why := _unsupported_message(f, value)) is not None:
        refuse(why)
    return _mapped(f, value)


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
                parser.exit(2, f"{parser.prog}: error: {option_string} got {len(values)} values: "
                               f"{f.metadata['one_of_many']}\n")
            values = values[0]
        if (why := _unsupported_message(f, values)) is not None:
            parser.exit(2, f"{parser.prog}: error: {why}\n")
        setattr(namespace, self.dest, _mapped(f, values))


ENV_EPILOG = (f"Every flag can also be set in the environment as {ENV_PREFIX}<FLAG>: the flag's name upper-cased "
              f"with _ (--model-path: {ENV_PREFIX}MODEL_PATH; booleans 1/true/yes/on or 0/false/no/off). "
              "Flags on the command line win. SGLang's and vLLM's other flags are accepted with a warning where "
              "they cannot change what is served, and refused with a reason otherwise.")


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
    parser.add_argument("--config", metavar="YAML", help="a YAML file of flags (`model-path: M`, `tp-size: 2`, "
                        "`disable-radix-cache: true`), as SGLang's --config; the command line wins")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in flag_fields():
        group = groups[f.metadata["group"]]
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict = {"dest": f.name, "help": f.metadata["help"]}
        if isinstance(f.default, bool):
            # --flag / --no-flag, so that the command line can turn off what the environment turned on.
            group.add_argument(flag, *f.metadata["aliases"], action=argparse.BooleanOptionalAction,
                               default=_env_default(parser, f, bool), **kwargs)
            continue
        kind = _field_type(f)
        if kind is not None:
            kwargs["type"] = kind
        if f.metadata["choices"] is not None:
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata["supported"] is not None or f.metadata["one_of_many"] or f.metadata["value_map"]:
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
        raise FlagError(f"--kv-cache-dtype {args.kv_cache_dtype}: the KV cache is kept in the model's dtype here; "
                        "pass --dtype bfloat16 with it, or leave --kv-cache-dtype at auto")
    if args.schedule_conservativeness < 0:
        raise FlagError("--schedule-conservativeness must be at least 0")
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
    return dataclasses.replace(args, scheduler_addr=replica_addrs(args.scheduler_addr, args.dp_size)[index],
                               executor_addr=replica_addrs(args.executor_addr, args.dp_size)[index],
                               base_gpu_id=args.base_gpu_id + index * args.tp_size, dp_rank=index)


def args_from_namespace(ns: argparse.Namespace, service: str) -> ServerArgs:
    """The ServerArgs of parsed flags, normalized (see normalize); raises FlagError for flags that do not fit."""
    from radixserve.common.foreign_flags import after_parse

    values = {f.name: getattr(ns, f.name) for f in flag_fields() if hasattr(ns, f.name)}
    args, why = after_parse(ns, normalize(ServerArgs(**values, service=service)))
    if why is not None:
        raise FlagError(why)
    return args
