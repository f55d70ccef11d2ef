"""Server flags shared by every service and by `radixserve serve`.

Flag names and defaults follow SGLang's `launch_server` where SGLang has the flag. Every service
accepts every flag, so one command line can be handed to all of them; each reads what it needs.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

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
    api_key: str | None = None  # None: every route is open
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
    grpc_auth_token: str | None = None  # None: $RADIXSERVE_GRPC_AUTH_TOKEN if set, else no token

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
            if f.metadata.get("cli") is False:
                continue
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    argv.append(flag)
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
    "schedule_policy": "fcfs (arrival order) | lpm (longest cached prefix first)",
    "disable_radix_cache": "do not reuse KV across requests",
    "disable_overlap_schedule": "plan each step only after the previous one returned",
    "grpc_host": "host the gateway's public gRPC API binds to",
    "gateway_grpc_port": "port of the gateway's public gRPC API",
    "tokenizer_addr": "host:port of the tokenizer service",
    "scheduler_addr": "host:port of the scheduler service",
    "executor_addr": "host:port of the executor service",
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
}


def add_server_args(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ServerArgs):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kwargs: dict = {"dest": f.name, "default": default, "help": _HELP.get(f.name, "")}
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        ftype = f.type if isinstance(f.type, str) else f.type.__name__
        if "int" in ftype:
            kwargs["type"] = int
        elif "float" in ftype:
            kwargs["type"] = float
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--tp-size", "--tp", dest="tp_size", type=int, default=1,
                        help="tensor parallel size (only 1 is supported so far)")


def args_from_namespace(ns: argparse.Namespace, service: str) -> ServerArgs:
    if getattr(ns, "tp_size", 1) != 1:
        raise SystemExit("error: --tp-size > 1 is not supported yet")
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(ServerArgs) if hasattr(ns, f.name)}
    return ServerArgs(**values, service=service)
