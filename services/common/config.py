"""Each component's configuration, one dataclass per component or concern: what is served (ModelSpec),
the scheduler, the executor's model runner, parallelism, the gateway, addresses, lifecycle, telemetry
and security between services.

Each field declares its flag once with option(...): help, choices, aliases and its section of `--help`
live in the field's metadata, and the parser is generated from them (args.add_server_args). ServerArgs
(services/common/args.py), the flags every service takes, inherits every one of these classes, so a
service hands its ServerArgs to a component that asks for its own config: components take their config
whole, Scheduler(SchedulerConfig, ...) and ModelRunner(folder, RunnerConfig, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from radixserve.gateway.pipeline.reasoning_parsers.registry import REASONING_PARSER_NAMES
from radixserve.scheduler.ngram_proposer import NgramParams

_NGRAM = NgramParams()  # the n-gram flags' defaults (the flags default to None: these)
DEFAULT_EAGLE_STEPS = 3  # --speculative-num-steps when unset (SGLang's usual EAGLE chain)

# The most requests decoded together when --max-running-requests is unset: the scheduler's default
# is below it (scheduler/server.py) and the executor sizes its slot table for it.
MAX_RUNNING_REQUESTS_CAP = 256
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
    "LoRA",
    "Kernel backends",
    "Expert parallelism",
    "Speculative decoding",
    "Optimization/debug options",
    "Services and addresses (radixserve)",
    "Limits and lifecycle (radixserve)",
    "Security between services (radixserve)",
)


def option(
    default,
    help: str,
    *,
    group: str,
    choices=None,
    supported=None,
    unsupported_hint: str = "",
    value_map: dict | None = None,
    aliases: tuple[str, ...] = (),
    tokens: bool = False,
    one_of_many: str = "",
    secret: bool = False,
    cli: bool = True,
    many: bool = False,
):
    """A config field with its flag's description.

    choices: the values the parser accepts (SGLang's list where it has one); supported: the subset
    honoured here (default: all of them). A value in choices but not supported is refused at start
    (exit 2) with unsupported_hint, so a pasted SGLang command fails with a reason, not a typo error.
    value_map: other projects' names of a supported value (SGLang's `qwen25` tool parser is `hermes`).
    tokens: a token count, also written 32k (32,000) or 32K (32,768) as SGLang and vLLM take it.
    one_of_many: the flag takes several values in vLLM (nargs +); one is honoured, more are refused
    with this reason. secret: never passed on a command line (argv shows in `ps`). cli=False: not a flag.
    many: the flag takes several values (nargs +), kept as one space-separated string."""
    assert group in GROUPS, group
    meta = {
        "help": help,
        "group": group,
        "choices": choices,
        "supported": supported,
        "unsupported_hint": unsupported_hint,
        "value_map": value_map or {},
        "aliases": tuple(aliases),
        "tokens": tokens,
        "one_of_many": one_of_many,
        "secret": secret,
        "cli": cli,
        "many": many,
    }
    return field(default=default, metadata=meta)


_DTYPES = ["auto", "half", "float16", "fp16", "bfloat16", "bf16", "float", "float32", "fp32"]
# SGLang's --load-format and --kv-cache-dtype choices; the supported subsets are what this version honours.
_SGLANG_LOAD_FORMATS = [
    "auto",
    "pt",
    "safetensors",
    "npcache",
    "dummy",
    "sharded_state",
    "gguf",
    "bitsandbytes",
    "layered",
    "remote",
    "remote_instance",
    "fastsafetensors",
    "runai_streamer",
]
_SGLANG_KV_CACHE_DTYPES = [
    "auto",
    "fp8_e5m2",
    "fp8_e4m3",
    "bf16",
    "bfloat16",
    "fp4_e2m1",
    "mxfp8",
    "nvfp4",
    "fp8",
    "fp8_inc",
    "fp8_ds_mla",
]
_SGLANG_ATTENTION_BACKENDS = [
    "triton",
    "torch_native",
    "flex_attention",
    "flashinfer",
    "fa3",
    "fa4",
    "flashmla",
    "cutlass_mla",
    "trtllm_mla",
    "trtllm_mha",
    "dual_chunk_flash_attn",
    "aiter",
    "wave",
    "intel_amx",
    "ascend",
    "intel_xpu",
]


@dataclass
class ModelSpec:
    """What is served: the model, its tokenizer and chat template, how its weights load."""

    model_path: str | None = option(
        None,
        "HF model folder, hub id (org/name, resolved through the HF cache; --revision, --download-dir), "
        ".gguf file, or folder holding one; default: the embedded SmolLM2-135M-Instruct",
        group="Model and tokenizer",
        aliases=("--model",),
    )
    tokenizer_path: str | None = option(
        None,
        "tokenizer folder or hub id (default: the model's)",
        group="Model and tokenizer",
        aliases=("--tokenizer",),
    )
    revision: str | None = option(
        None,
        "for a hub id: the branch, tag or commit to load (default: main)",
        group="Model and tokenizer",
    )
    download_dir: str | None = option(
        None,
        "for a hub id: the cache folder to read and download into (default: the hub's cache, $HF_HOME)",
        group="Model and tokenizer",
    )
    load_format: str = option(
        "auto",
        "auto | safetensors | gguf | dummy (random weights)",
        group="Model and tokenizer",
        choices=_SGLANG_LOAD_FORMATS,
        supported=["auto", "safetensors", "gguf", "dummy"],
        unsupported_hint="not supported yet",
    )
    context_length: int | None = option(
        None,
        "longest prompt + generation (default: the model's max_position_embeddings)",
        group="Model and tokenizer",
        aliases=("--max-model-len",),
        tokens=True,
    )
    is_embedding: bool = option(
        False,
        "serve embeddings (/v1/embeddings) instead of generation: models pooled as their "
        "sentence-transformers config says (without one: encoders by mean, decoders on the last "
        "token, L2-normalized); *ForSequenceClassification models answer their label scores, "
        "also through /v1/classify",
        group="Model and tokenizer",
    )
    skip_tokenizer_init: bool = option(
        False, "run without a tokenizer (token ids in, token ids out)", group="Model and tokenizer"
    )
    dtype: str = option(
        "auto",
        "auto | bfloat16 | float16 | float32 (auto: the config's dtype)",
        group="Quantization and data type",
        choices=_DTYPES,
    )
    quantization: str | None = option(
        None,
        "fp8 (online from a bf16/fp16 checkpoint, or an fp8 checkpoint as published), awq, gptq, "
        "compressed-tensors (read from the checkpoint's quantization_config), gguf: a .gguf model "
        "served with its quantized blocks as stored (CPU AVX2 kernels, Triton kernels on CUDA; the "
        "default on the CPU for Q4_0/Q4_1/Q8_0 files), unquant: a .gguf dequantized to the --dtype "
        "at load (the default on CUDA and for other block types)",
        group="Quantization and data type",
        aliases=("-q",),
        choices=[
            "awq",
            "fp8",
            "mxfp8",
            "gptq",
            "marlin",
            "gptq_marlin",
            "awq_marlin",
            "bitsandbytes",
            "gguf",
            "modelopt",
            "modelopt_fp8",
            "modelopt_fp4",
            "petit_nvfp4",
            "w8a8_int8",
            "w8a8_fp8",
            "moe_wna16",
            "qoq",
            "w4afp8",
            "mxfp4",
            "auto-round",
            "compressed-tensors",
            "modelslim",
            "quark",
            "unquant",
            "fp8_inc",
            "experts_int8",
            "fbgemm_fp8",
            "torchao",
            "gptq_marlin_24",
            "awq_marlin_24",
        ],
        supported=["gguf", "unquant", "fp8", "awq", "gptq", "compressed-tensors"],
        unsupported_hint="quantized weights are not supported yet: serve a bf16/fp16 checkpoint",
    )
    kv_cache_dtype: str = option(
        "auto",
        "KV cache dtype. auto: the model's dtype; fp8_e5m2 / fp8_e4m3 (vLLM's fp8): fp8 with a K and a "
        "V scale per layer (--quantization-param-path, else the checkpoint's k_scale/v_scale, else 1.0), "
        "twice the tokens of a bf16 cache in the same memory",
        group="Quantization and data type",
        choices=_SGLANG_KV_CACHE_DTYPES,
        supported=["auto", "bf16", "bfloat16", "fp8_e5m2", "fp8_e4m3", "fp8"],
        value_map={"fp8": "fp8_e4m3"},
        unsupported_hint="this KV cache dtype is not supported yet; use auto, fp8_e5m2 or fp8_e4m3",
    )
    quantization_param_path: str | None = option(
        None,
        "JSON of per-layer KV cache scales for --kv-cache-dtype fp8_* (vLLM's and SGLang's format: "
        '{"kv_cache": {"scaling_factor": {"<tp rank>": {"<layer>": scale}}}}); it wins over the '
        "checkpoint's k_scale/v_scale tensors; unused with a KV cache in the model's dtype",
        group="Quantization and data type",
    )
    chat_template: str | None = option(
        None,
        "SGLang's named template (chatml, llama-3-instruct, ...), a file holding a Jinja chat template, or "
        "the template itself, to use instead of the model's",
        group="API related",
    )


@dataclass
class CapacityConfig:
    """The batch limits the scheduler plans within and the executor sizes its KV pool and slot table for."""

    max_running_requests: int | None = option(
        None,
        "most requests decoded together",
        group="Memory and scheduling",
        aliases=("--max-num-seqs",),
    )
    max_total_tokens: int | None = option(
        None,
        "KV pool size in tokens (overrides --mem-fraction-static)",
        group="Memory and scheduling",
        tokens=True,
    )


# Defaults and limits of the LoRA flags (LoraConfig), imported by the executor and the scheduler.
MAX_LORA_RANK_LIMIT = 64  # the largest --max-lora-rank: kernels/lora.py stacks 3 shards of it
DEFAULT_MAX_LORAS_PER_BATCH = 8
MAX_LORA_NAME_CHARS = 256  # an adapter's name travels in every request that uses it


def lora_name_problem(name: str) -> str | None:
    """Why name cannot name a LoRA adapter (None: it can): ':' separates BASE:ADAPTER model names."""
    if not name or len(name) > MAX_LORA_NAME_CHARS or ":" in name:
        return f"an adapter name must have 1..{MAX_LORA_NAME_CHARS} characters and no ':'"
    return None


@dataclass
class LoraConfig:
    """LoRA adapters served beside the base model (the executor holds their weights, the scheduler
    caps how many distinct ones a step runs)."""

    enable_lora: bool = option(
        False,
        "serve LoRA adapters (on by itself with --lora-paths); adapters can then be loaded at run time",
        group="LoRA",
    )
    lora_paths: str | None = option(
        None,
        "adapters loaded at start: NAME=PATH or PATH (named PATH), each a PEFT folder "
        "(adapter_config.json + adapter_model.safetensors)",
        group="LoRA",
        aliases=("--lora-modules",),
        many=True,
    )
    max_loras_per_batch: int = option(
        DEFAULT_MAX_LORAS_PER_BATCH,
        "most distinct adapters in one step (the executor's GPU adapter slots)",
        group="LoRA",
    )
    max_loaded_loras: int | None = option(
        None,
        "most adapters held in host memory (default: 4 x --max-loras-per-batch); more is a 400 at load",
        group="LoRA",
    )
    max_lora_rank: int | None = option(
        None,
        f"largest adapter rank (default: the largest of --lora-paths, else {MAX_LORA_RANK_LIMIT}; "
        f"at most {MAX_LORA_RANK_LIMIT})",
        group="LoRA",
    )
    lora_target_modules: str | None = option(
        None,
        "modules adapters may target: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj or all "
        "(default: all)",
        group="LoRA",
        many=True,
    )
    lora_backend: str = option(
        "triton",
        "triton (kernels/lora.py) | torch (its torch reference)",
        group="LoRA",
        choices=["triton", "csgmv", "flashinfer", "torch", "ascend"],
        supported=["triton", "torch"],
        unsupported_hint="not available here; use triton or torch",
    )

    @property
    def lora_enabled(self) -> bool:
        return bool(self.enable_lora or self.lora_paths)


@dataclass
class SpeculativeConfig:
    """Speculative decoding (docs/speculative.md): the scheduler plans verify steps, the executor
    runs the draft head or model (EAGLE, STANDALONE). Defaults of the n-gram settings: NgramParams."""

    speculative_algorithm: str | None = option(
        None,
        "NGRAM: draft tokens by n-gram lookup in each request's own prompt + output; EAGLE / EAGLE3: "
        "draft them with a draft head on the executor (--speculative-draft-model-path); STANDALONE: "
        "with a small draft model of the target's vocabulary (same flag); the target verifies them in "
        "one step (default: off)",
        group="Speculative decoding",
        choices=["EAGLE", "EAGLE3", "NEXTN", "STANDALONE", "NGRAM"],
        supported=["NGRAM", "EAGLE", "EAGLE3", "STANDALONE"],
        unsupported_hint="not supported yet: NGRAM, EAGLE, EAGLE3 and STANDALONE speculative decoding "
        "are built (NEXTN's MTP heads are not)",
    )
    speculative_num_draft_tokens: int | None = option(
        None,
        "tokens per verify step, the last verified one included (SGLang's count): at most this - 1 "
        f"draft tokens (NGRAM default {_NGRAM.max_draft_tokens + 1}; EAGLE, STANDALONE: "
        "--speculative-num-steps + 1)",
        group="Speculative decoding",
    )
    speculative_ngram_min_match_window_size: int | None = option(
        None,
        "shortest suffix of a request's tokens looked up for a draft "
        f"(default {_NGRAM.min_match_window_size})",
        group="Speculative decoding",
    )
    speculative_ngram_max_match_window_size: int | None = option(
        None,
        "longest suffix of a request's tokens looked up for a draft, tried first "
        f"(default {_NGRAM.max_match_window_size})",
        group="Speculative decoding",
    )
    speculative_ngram_max_bfs_breadth: int | None = option(
        None,
        "NGRAM: distinct continuations drafted per step, as a tree verified in one forward (each "
        "from another earlier occurrence of the request's last tokens; needs --page-size 1 and "
        f"--tp-size 1; default {_NGRAM.max_bfs_breadth}: a chain)",
        group="Speculative decoding",
    )
    speculative_ngram_history_window: int | None = option(
        None,
        "drafts are looked up in this many most recent tokens of the request "
        f"(default {_NGRAM.history_window})",
        group="Speculative decoding",
    )
    speculative_draft_model_path: str | None = option(
        None,
        "EAGLE / EAGLE3: the draft head's folder (config.json + safetensors or pytorch_model.bin); "
        "STANDALONE: the draft model's (a Llama-family causal LM of the target's vocabulary; random "
        "weights with --load-format dummy); or a hub id (fetched like --model-path's, into "
        "--download-dir)",
        group="Speculative decoding",
        aliases=("--speculative-draft-model",),
    )
    speculative_num_steps: int | None = option(
        None,
        "EAGLE / EAGLE3 / STANDALONE: draft tokens proposed per step, one draft forward each "
        f"(default {DEFAULT_EAGLE_STEPS})",
        group="Speculative decoding",
    )
    speculative_eagle_topk: int | None = option(
        None,
        "EAGLE / EAGLE3: branches kept per draft step; above 1 the head drafts a tree of "
        "--speculative-num-draft-tokens - 1 tokens (default num-steps * topk), verified in one "
        "step (needs --page-size 1, --tp-size 1; STANDALONE: 1)",
        group="Speculative decoding",
    )
    speculative_disable_by_batch_size: int | None = option(
        None,
        "no drafts in a step that decodes more than this many requests (a verify row costs more "
        "as the batch grows; docs/speculative.md has the measured costs); default: no limit",
        group="Speculative decoding",
    )


@dataclass
class SchedulerConfig(CapacityConfig, LoraConfig, SpeculativeConfig):
    """The scheduler: admission, prefill chunking, the radix prefix cache and structured-output limits."""

    max_queued_requests: int | None = option(
        None,
        "most requests waiting to run; past it new requests get 503 with Retry-After (default: no limit)",
        group="Memory and scheduling",
    )
    chunked_prefill_size: int = option(
        8192,
        "longest prompt chunk run in one step (-1: prefill each prompt whole)",
        group="Memory and scheduling",
        tokens=True,
    )
    max_prefill_tokens: int = option(
        16384,
        "most prompt tokens run in one prefill step",
        group="Memory and scheduling",
        tokens=True,
    )
    schedule_policy: str = option(
        "fcfs",
        "fcfs (arrival order) | lpm (longest cached prefix first)",
        group="Memory and scheduling",
        choices=["fcfs", "lpm", "random", "dfs-weight", "lof", "priority", "routing-key"],
        supported=["fcfs", "lpm"],
        unsupported_hint="not supported yet",
    )
    schedule_conservativeness: float = option(
        1.0,
        "how much KV a running request is assumed to still need when admitting new ones (the initial new-token "
        "ratio is min(0.7 x this, 1)): larger admits fewer requests and retracts less",
        group="Memory and scheduling",
    )
    enable_mixed_chunk: bool = option(
        False,
        "run a prefill chunk and the running requests' decode tokens in one step",
        group="Memory and scheduling",
    )
    stream_interval: int = option(
        1,
        "stream a request's output every this many generated tokens (the first token and the finish "
        "at once): larger sends fewer, larger messages to the client, for throughput",
        group="Runtime options",
    )
    page_size: int = option(
        1,
        "KV slots per page: allocation and prefix-cache reuse happen in whole pages",
        group="Memory and scheduling",
        aliases=("--block-size",),
    )
    disable_radix_cache: bool = option(
        False, "do not reuse KV across requests", group="Optimization/debug options"
    )
    disable_overlap_schedule: bool = option(
        False,
        "plan each step only after the previous one returned",
        group="Optimization/debug options",
    )
    grammar_compile_timeout: float = option(
        10.0,
        "seconds a structured-output constraint (json_schema, regex, ebnf) may take to compile; longer is a 400",
        group="Limits and lifecycle (radixserve)",
    )
    grammar_max_concurrent_compiles: int = option(
        2,
        "constraints compiled at once (the others wait, within --grammar-compile-timeout)",
        group="Limits and lifecycle (radixserve)",
    )
    grammar_max_bytes: int = option(
        131072,
        "largest constraint (schema, regex or grammar text) in bytes; a larger one is a 400 before compiling",
        group="Limits and lifecycle (radixserve)",
    )


@dataclass
class RunnerConfig(ModelSpec, CapacityConfig, LoraConfig, SpeculativeConfig):
    """The executor's model runner: device, KV memory, kernels and CUDA graphs."""

    device: str = option("auto", "auto | cpu | cuda | cuda:N", group="Runtime options")
    mem_fraction_static: float | None = option(
        None,
        "fraction of device memory for weights + KV cache (default 0.85 on CUDA)",
        group="Memory and scheduling",
        aliases=("--gpu-memory-utilization",),
    )
    random_seed: int | None = option(
        None,
        "seed for dummy weights and unseeded sampling",
        group="Runtime options",
        aliases=("--seed",),
    )
    attention_backend: str | None = option(
        None,
        "triton | torch_native (default: triton on CUDA, torch_native on CPU)",
        group="Kernel backends",
        choices=_SGLANG_ATTENTION_BACKENDS,
        supported=["triton", "torch_native"],
        unsupported_hint="not available here; use triton (CUDA) or torch_native",
    )
    cuda_graph_max_bs: int = option(
        256,
        "largest decode batch replayed from a captured CUDA graph",
        group="Optimization/debug options",
        aliases=("--cuda-graph-max-bs-decode",),
    )
    disable_cuda_graph: bool = option(
        False, "run every step eagerly (no CUDA graphs)", group="Optimization/debug options"
    )
    enable_torch_compile: bool = option(
        False,
        "run decode batches of up to --torch-compile-max-bs through a torch.compile'd forward, compiled "
        "at start (then captured in the CUDA graphs where those are on); larger batches and prefill run "
        "uncompiled",
        group="Optimization/debug options",
    )
    torch_compile_max_bs: int = option(
        32,
        "largest decode batch run compiled with --enable-torch-compile",
        group="Optimization/debug options",
    )


@dataclass
class ParallelConfig:
    """Tensor, expert and data parallelism, over one or several nodes."""

    tp_size: int = option(
        1,
        "tensor parallel size: the executor runs this many shards (one per GPU; on CPU, all on the host), "
        "split evenly over --nnodes nodes",
        group="Runtime options",
        aliases=("--tensor-parallel-size", "--tp", "-tp"),
    )
    tp_rank: int | None = option(
        None,
        "this shard's tensor-parallel rank (set by the executor on the shards it starts; "
        "default: the first rank of --node-rank)",
        group="Runtime options",
    )
    base_gpu_id: int = option(
        0,
        "the first CUDA device the executor uses: shard k of a node takes cuda:(base_gpu_id + k) "
        "(`serve --dp-size N` gives replica i base_gpu_id + i * tp_size)",
        group="Runtime options",
    )
    nnodes: int = option(
        1, "number of nodes the tensor-parallel shards span", group="Multi-node distributed serving"
    )
    node_rank: int = option(
        0,
        "this node's index (0..nnodes-1); nodes other than 0 run only executor shards, which join node 0's group",
        group="Multi-node distributed serving",
    )
    dist_init_addr: str | None = option(
        None,
        "HOST:PORT where rank 0 (node 0) serves the shards' rendezvous; needed with --nnodes > 1 "
        "(default: a free loopback port)",
        group="Multi-node distributed serving",
        aliases=("--nccl-init-addr",),
    )
    ep_size: int = option(
        1,
        "expert parallel size for MoE models: the experts are split over this many groups of the --tp-size shards "
        "(each group holds E / ep_size experts; within a group the tp_size / ep_size shards split each expert's "
        "intermediate size); must divide --tp-size",
        group="Expert parallelism",
        aliases=("--expert-parallel-size", "--ep"),
    )
    enable_ep_moe: bool = option(
        False,
        "expert parallelism over all tensor-parallel shards (--ep-size = --tp-size)",
        group="Expert parallelism",
    )
    dp_size: int = option(
        1,
        "data parallel size: run this many scheduler + executor replicas, each with its own KV cache and prefix "
        "cache (and --tp-size shards); the gateway routes each request to one of them. Replica i listens at the "
        "i-th address of --scheduler-addr / --executor-addr, or, when one address is given, at its port + "
        f"i * {DP_PORT_STRIDE}",
        group="Data parallelism",
        aliases=("--data-parallel-size", "--dp", "-dp"),
    )
    dp_rank: int | None = option(
        None,
        "this process's data-parallel replica (set by `serve` on each replica's scheduler and executor)",
        group="Data parallelism",
    )


@dataclass
class GatewayConfig:
    """The gateway: its HTTP and API settings, request limits and how it picks a replica."""

    host: str = option("127.0.0.1", "HTTP host of the gateway", group="HTTP server")
    port: int = option(30000, "HTTP port of the gateway", group="HTTP server")
    api_key: str | None = option(
        None,
        "require `Authorization: Bearer KEY` on every HTTP route but /health and on the gRPC API",
        group="API related",
        secret=True,
        one_of_many="several API keys are not supported yet",
    )
    served_model_name: str | None = option(
        None,
        "model name reported by the API (default: the hub id, or derived from the model path)",
        group="API related",
        one_of_many="several served model names are not supported yet",
    )
    tool_call_parser: str | None = option(
        None,
        "format of the model's tool calls: hermes (Qwen, Hermes; SGLang's qwen25) | llama3 | qwen3_coder | "
        "mistral | deepseekv3 | pythonic | kimi_k2 | gpt-oss (default or auto: hermes or llama3, chosen "
        "from the model's architecture and name)",
        group="API related",
        supported=[
            "hermes",
            "qwen",
            "qwen25",
            "llama3",
            "llama3_json",
            "qwen3_coder",
            "mistral",
            "deepseekv3",
            "deepseek_v3",
            "deepseekv31",
            "pythonic",
            "kimi_k2",
            "gpt-oss",
            "openai",
            "auto",
        ],
        value_map={
            "llama3_json": "llama3",
            "qwen": "hermes",
            "qwen25": "hermes",
            "deepseek_v3": "deepseekv3",
            "deepseekv31": "deepseekv3",
            "openai": "gpt-oss",
            "auto": None,
        },
        unsupported_hint="this tool call format is not supported yet",
    )
    reasoning_parser: str | None = option(
        None,
        "split the model's reasoning from its answer in chat completions (message.reasoning_content "
        "and vLLM's reasoning): deepseek-r1 | qwen3 | qwen3-thinking (templates that open <think> in "
        "the prompt) | glm45 | kimi | gpt-oss (harmony's analysis channel); vLLM's deepseek_r1 and "
        "openai_gptoss too. Default: no split",
        group="API related",
        supported=list(REASONING_PARSER_NAMES),
        unsupported_hint="unknown reasoning parser",
    )
    generation_config: str = option(
        "auto",
        "sampling defaults for what a request leaves out: auto (the model's generation_config.json: "
        "temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) | vllm (none: the API's "
        "own defaults) | a folder holding a generation_config.json (vLLM's flag; SGLang's "
        "--sampling-defaults model is auto, openai is vllm)",
        group="API related",
        aliases=("--sampling-defaults",),
        value_map={"model": "auto", "openai": "vllm"},
    )
    preferred_sampling_params: str | None = option(
        None,
        "JSON object of server-wide sampling defaults for what a request leaves out, over "
        "--generation-config's (keys: temperature, top_p, top_k, min_p, repetition_penalty, "
        "frequency_penalty, presence_penalty, max_new_tokens), e.g. "
        '\'{"temperature": 0.7, "max_new_tokens": 512}\'',
        group="API related",
    )
    override_generation_config: str | None = option(
        None,
        "JSON object over --generation-config's defaults and --preferred-sampling-params "
        "(vLLM's flag; same keys)",
        group="API related",
    )
    file_storage_path: str | None = option(
        None,
        "folder for /v1/files uploads and /v1/batches state "
        "(default: $XDG_DATA_HOME/radixserve/storage, i.e. ~/.local/share/radixserve/storage)",
        group="API related",
    )
    load_balance_method: str = option(
        "cache_aware",
        "how the gateway picks a replica (--dp-size > 1): round_robin | shortest_queue (fewest "
        "requests in flight) | cache_aware (the replica that most likely caches the prompt's prefix, "
        "unless the load is too uneven); SGLang's auto is round_robin, total_requests shortest_queue",
        group="Data parallelism",
        choices=[
            "round_robin",
            "shortest_queue",
            "cache_aware",
            "auto",
            "total_requests",
            "total_tokens",
            "minimum_tokens",
            "follow_bootstrap_room",
        ],
        supported=["round_robin", "shortest_queue", "cache_aware", "auto", "total_requests"],
        value_map={"auto": "round_robin", "total_requests": "shortest_queue"},
        unsupported_hint="not supported yet",
    )
    allowed_local_media_path: str | None = option(
        None,
        "folder whose files requests may name as images (file:// URLs or absolute paths; vLLM's "
        "flag); unset: local files are refused",
        group="API related",
    )
    max_images_per_request: int = option(
        16, "most images one request may carry; more is a 400", group="API related"
    )
    max_image_bytes: int = option(
        20 * 1024 * 1024,
        "largest encoded image in bytes (a data: URL's decoded bytes, a file, a download); larger is a 400",
        group="API related",
    )
    media_fetch_timeout: float = option(
        10.0,
        "seconds the gateway may take to download one http(s) image; then the request gets a 400",
        group="API related",
    )
    max_payload_size: int = option(
        32 * 1024 * 1024,
        "largest HTTP request body in bytes; a larger one gets 413",
        group="Limits and lifecycle (radixserve)",
    )
    allow_auto_truncate: bool = option(
        False,
        "keep the last tokens of a prompt longer than the context instead of answering 400",
        group="Limits and lifecycle (radixserve)",
    )
    request_timeout: float | None = option(
        None,
        "seconds a request may take end to end before it is aborted (default: no limit)",
        group="Limits and lifecycle (radixserve)",
    )
    max_request_sequences: int = option(
        256,
        "most sequences one request may ask for (prompts x n; also counted against --max-queued-requests); "
        "more is a 400",
        group="Limits and lifecycle (radixserve)",
    )
    http_max_header_bytes: int = option(
        65536,
        "largest HTTP request head (request line + headers) in bytes; larger gets 431 and the connection closes",
        group="Limits and lifecycle (radixserve)",
    )
    http_max_headers: int = option(
        100, "most HTTP request headers; more gets 431", group="Limits and lifecycle (radixserve)"
    )
    http_header_timeout: float = option(
        10.0,
        "seconds a client may take to send a request's headers; then the connection closes",
        group="Limits and lifecycle (radixserve)",
    )
    http_keep_alive_timeout: float = option(
        5.0,
        "seconds an idle keep-alive HTTP connection stays open",
        group="Limits and lifecycle (radixserve)",
    )
    http_max_connections: int | None = option(
        None,
        "most open HTTP connections; past it new ones get 503 and close (default: from the open-file limit)",
        group="Limits and lifecycle (radixserve)",
    )


@dataclass
class AddressConfig:
    """Where each service listens and dials the others."""

    grpc_host: str = option(
        "127.0.0.1",
        "host the gateway's public gRPC API binds to",
        group="Services and addresses (radixserve)",
    )
    gateway_grpc_port: int = option(
        DEFAULT_GRPC_PORTS["gateway"],
        "port of the gateway's public gRPC API",
        group="Services and addresses (radixserve)",
    )
    tokenizer_worker_num: int = option(
        1,
        "tokenizer processes: with one --tokenizer-addr, replica i listens at its port + i * 100",
        group="Services and addresses (radixserve)",
    )
    detokenizer_worker_num: int = option(
        1,
        "detokenizer processes: with one --detokenizer-addr, replica i listens at its port + i * 100",
        group="Services and addresses (radixserve)",
    )
    tokenizer_addr: str = option(
        f"127.0.0.1:{DEFAULT_GRPC_PORTS['tokenizer']}",
        "host:port of the tokenizer service (comma-separated: replicas)",
        group="Services and addresses (radixserve)",
    )
    scheduler_addr: str = option(
        f"127.0.0.1:{DEFAULT_GRPC_PORTS['scheduler']}",
        "host:port of the scheduler service (with --dp-size N: N comma-separated addresses, or one whose port is "
        "replica 0's)",
        group="Services and addresses (radixserve)",
    )
    executor_addr: str = option(
        f"127.0.0.1:{DEFAULT_GRPC_PORTS['executor']}",
        "host:port of the executor service (with --dp-size N: as --scheduler-addr)",
        group="Services and addresses (radixserve)",
    )
    detokenizer_addr: str = option(
        f"127.0.0.1:{DEFAULT_GRPC_PORTS['detokenizer']}",
        "host:port of the detokenizer service (comma-separated: replicas)",
        group="Services and addresses (radixserve)",
    )

    def listen_addr(self, service: str) -> str:
        """The host:port a service binds its gRPC server to."""
        if service == "gateway":
            return f"{self.grpc_host}:{self.gateway_grpc_port}"
        return getattr(self, f"{service}_addr")


@dataclass
class LifecycleConfig:
    """Start-up, hung-step detection and shutdown, for every service."""

    skip_server_warmup: bool = option(
        False,
        "say ready without warming up (the first requests then pay for kernel compilation and autotuning)",
        group="Runtime options",
    )
    watchdog_timeout: float = option(
        300.0,
        "seconds one executor step may run before it is reported hung and the executor restarted",
        group="Runtime options",
    )
    shutdown_timeout: float = option(
        30.0,
        "on SIGTERM, seconds accepted requests get to finish before the process exits",
        group="Limits and lifecycle (radixserve)",
    )


@dataclass
class TelemetryConfig:
    """Logs, metrics and traces."""

    log_level: str = option(
        "info",
        "debug | info | warning | error",
        group="Logging",
        choices=["debug", "info", "warning", "error", "critical"],
    )
    log_requests: bool = option(
        False, "log each request's id, trace id, parameters and outcome", group="Logging"
    )
    enable_metrics: bool = option(
        False,
        "serve Prometheus metrics at the gateway's /metrics (the scheduler's included)",
        group="Logging",
    )
    enable_trace: bool = option(
        False,
        "send OpenTelemetry traces (to --otlp-traces-endpoint, default localhost:4317)",
        group="Logging",
    )
    otlp_traces_endpoint: str | None = option(
        None,
        "send OpenTelemetry traces to this OTLP gRPC endpoint, e.g. localhost:4317 "
        "(needs `pip install radixserve[tracing]`; default: tracing off)",
        group="Logging",
    )
    trace_sample_ratio: float = option(
        1.0,
        "fraction of requests traced (parent-based: an incoming sampled traceparent is honoured)",
        group="Logging",
    )


@dataclass
class SecurityConfig:
    """Authentication and TLS between services."""

    grpc_tls_cert: str | None = option(
        None,
        "PEM certificate of this service's gRPC server (TLS between services)",
        group="Security between services (radixserve)",
    )
    grpc_tls_key: str | None = option(
        None, "PEM private key for --grpc-tls-cert", group="Security between services (radixserve)"
    )
    grpc_tls_ca: str | None = option(
        None,
        "PEM CA bundle that signs the other services' certificates (clients verify with it)",
        group="Security between services (radixserve)",
    )
    insecure_internal: bool = option(
        False,
        "let a service started alone listen on a non-loopback address without --grpc-auth-token or TLS",
        group="Security between services (radixserve)",
    )
    # None: $RADIXSERVE_GRPC_AUTH_TOKEN if set, else none (`serve` then makes one up for its services).
    grpc_auth_token: str | None = option(
        None,
        "shared secret sent in gRPC metadata between services and required by every service "
        "(default: $RADIXSERVE_GRPC_AUTH_TOKEN)",
        group="Security between services (radixserve)",
        secret=True,
    )
