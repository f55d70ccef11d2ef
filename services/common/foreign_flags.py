"""SGLang's and vLLM's flags that are not ServerArgs fields, so that their command lines paste here.

Each flag of SGLang's `launch_server` (its server-arguments reference) and each everyday flag of
`vllm serve` is exactly one of:
- honoured: a ServerArgs field or one of its aliases (services/common/config.py); a switch mapped onto
  fields (MAPPED below: `--enforce-eager` is `--disable-cuda-graph`, ...); or a setting that has one
  value here, accepted with that value and refused with any other (FIXED: `--pp-size 1`);
- ignored: accepted with a one-line warning that it has no effect here and why, only where ignoring it
  cannot change outputs or the resources a user relies on (IGNORED);
- refused: the start stops (exit 2) with a message that says what to use instead, or that the feature
  is not supported yet (REFUSED).
tests/data/sglang_flags.tsv and tests/data/vllm_flags.tsv list every flag with its class, and
tests/common/test_foreign_flags.py checks what the parser does with each.

Tables: one flag per line, `spellings | arity | ...`: spellings comma-separated, arity `none` (a
switch), `one` (one value) or `many` (one or more values). These flags are left out of `--help`, which
lists what is honoured as radixserve's own flags in SGLang's sections.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

IGNORED_KEY = "_ignored_foreign_flags"  # namespace attribute: [(flag as written, reason)]
FIXED_KEY = "_fixed_foreign_flags"
VLLM_EP_KEY = "_vllm_expert_parallel"  # vLLM's --enable-expert-parallel given  # namespace attribute: {flag: value} of FIXED flags checked after parsing


@dataclass(frozen=True)
class ForeignFlag:
    spellings: tuple[str, ...]
    arity: str  # none | one | many
    reason: str
    honoured: tuple[str, ...] = ()  # FIXED: the values that match what radixserve does


def _table(text: str, fixed: bool = False) -> list[ForeignFlag]:
    flags = []
    for line in text.strip().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if fixed:
            spellings, arity, honoured, reason = (part.strip() for part in line.split("|", 3))
        else:
            (spellings, arity, reason), honoured = (part.strip() for part in line.split("|", 2)), ""
        assert arity in ("none", "one", "many"), line
        flags.append(
            ForeignFlag(
                tuple(s.strip() for s in spellings.split(",")),
                arity,
                reason,
                tuple(v.strip() for v in honoured.split(",") if v.strip()),
            )
        )
    return flags


# Settings with one value here: `spellings | arity | honoured values | why another value is refused`.
# A switch (arity none) is radixserve's behaviour already: accepted silently. <tp_size>: equal to --tp-size.
FIXED = _table(
    """
--tokenizer-mode | one | auto | only fast (Rust) tokenizers are used here; leave it at auto
--tokenizer-backend | one | huggingface | only the Hugging Face tokenizers are used here
--model-loader-extra-config | one | {} | model loader options are not supported yet
--model-impl | one | auto, sglang | only radixserve's own model code runs here (transformers or other implementations are not supported)
--pp-size, --pipeline-parallel-size, -pp | one | 1 | pipeline parallelism is not supported yet: split the model with --tp-size (over several nodes with --nnodes)
--attn-cp-size, --attention-context-parallel-size | one | 1 | attention context parallelism is not supported yet
--moe-dp-size, --moe-data-parallel-size | one | 1 | MoE data parallelism is not supported yet (use --ep-size)
--dcp-size, --decode-context-parallel-size | one | 1 | decode context parallelism is not supported yet
--constrained-json-disable-any-whitespace | none | | JSON constraints already allow no free whitespace here
--gpu-id-step | one | 1 | shards take consecutive GPUs from --base-gpu-id; choose others with CUDA_VISIBLE_DEVICES
--radix-eviction-policy | one | lru | the prefix cache evicts least recently used leaves; other policies are not supported yet
--json-model-override-args | one | {} | overriding the model's config is not supported yet
--grammar-backend | one | xgrammar | structured output runs on xgrammar only
--moe-a2a-backend | one | none | expert outputs are combined by all-reduce; all-to-all backends are not supported yet
--ep-num-redundant-experts | one | 0 | redundant experts are not supported yet
--init-expert-location | one | trivial | experts are placed in order; placement files are not supported yet
--moe-dense-tp-size | one | <tp_size> | dense layers are split over all --tp-size shards; another split is not supported yet
--elastic-ep-backend | one | none | elastic expert parallelism is not supported yet
--cpu-offload-gb | one | 0 | CPU weight offload is not supported yet
--offload-group-size | one | -1 | layer offload is not supported yet
--cuda-graph-backend-prefill | one | disabled | prefill runs eagerly; prefill CUDA graphs are not supported yet
--num-continuous-decode-steps | one | 1 | multi-step decoding is not supported yet
--disaggregation-mode | one | null | prefill/decode disaggregation is not supported yet
--enable-auto-tool-choice | none | | tool_choice "auto" is always allowed here
--max-logprobs | one | 20 | top_logprobs is capped at 20 here
""",
    fixed=True,
)

# Accepted with a warning: `spellings | arity | why it has no effect here`.
IGNORED = _table("""
--trust-remote-code | none | radixserve runs built-in architectures only; custom modeling code from the Hub is never run
--enable-multimodal | none | multimodal inputs are not supported; text-only models are served as usual (VLM architectures are refused at load)
--warmups | one | SGLang's custom warmup functions do not exist here; radixserve runs its own warm-up
--nccl-port | one | tensor-parallel shards meet on a free loopback port (or --dist-init-addr); no fixed NCCL port is needed
--rl-quant-profile | one | only used with --load-format flash_rl, which radixserve refuses
--enable-dynamic-chunking | none | only used with pipeline parallelism (--pp-size > 1), which radixserve refuses
--schedule-low-priority-values-first | none | only used with --enable-priority-scheduling, which radixserve refuses
--priority-scheduling-preemption-threshold | one | only used with --enable-priority-scheduling, which radixserve refuses
--swa-full-tokens-ratio | one | radixserve keeps one full KV pool for every layer; there is no sliding-window pool to size
--disable-hybrid-swa-memory | none | radixserve never uses a hybrid sliding-window KV pool; every layer keeps full KV
--enable-prefill-delayer | none | the prefill delayer targets DP attention, which radixserve does not have
--prefill-delayer-max-delay-passes | one | only used with --enable-prefill-delayer (DP attention), which has no effect here
--prefill-delayer-token-usage-low-watermark | one | only used with --enable-prefill-delayer (DP attention), which has no effect here
--prefill-delayer-queue-min-ratio | one | only used with --enable-prefill-delayer (DP attention), which has no effect here
--prefill-delayer-max-delay-ms | one | only used with --enable-prefill-delayer (DP attention), which has no effect here
--prefill-delayer-forward-passes-buckets | many | prefill delayer histograms are not exported (no prefill delayer)
--prefill-delayer-wait-seconds-buckets | many | prefill delayer histograms are not exported (no prefill delayer)
--pp-max-micro-batch-size | one | only used with pipeline parallelism (--pp-size > 1), which radixserve refuses
--pp-async-batch-depth | one | only used with pipeline parallelism (--pp-size > 1), which radixserve refuses
--constrained-json-whitespace-pattern | one | only read by the outlines and llguidance grammar backends; radixserve uses xgrammar (SGLang's default)
--soft-watchdog-timeout | one | slow-step debug dumps are not written; --watchdog-timeout still restarts a hung executor
--dist-timeout | one | the shards' torch.distributed rendezvous uses radixserve's own timeout
--sleep-on-idle | none | CPU-idle tuning only; radixserve's services block on gRPC when idle
--custom-sigquit-handler | one | Engine-API only (a Python callable); has no effect on a command line, as in SGLang
--log-level-http | one | HTTP server logs follow --log-level
--log-requests-level | one | request logs have one level: ids, token counts and outcome, never prompt or output text
--log-requests-format | one | request logs are plain text lines
--log-requests-target | many | request logs go to the service's log (stderr)
--uvicorn-access-log-exclude-prefixes | many | access-log filtering is not available; logs only
--crash-dump-folder | one | crash dumps of recent requests are not written (debugging aid only)
--show-time-cost | none | timing marks are not logged (logs only)
--enable-mfu-metrics | none | MFU estimate metrics are not exported
--enable-metrics-for-all-schedulers | none | /metrics already includes every replica's scheduler (labelled dp_rank)
--tokenizer-metrics-custom-labels-header | one | custom metric labels from request headers are not supported
--tokenizer-metrics-allowed-custom-labels | many | custom metric labels from request headers are not supported
--bucket-time-to-first-token | many | radixserve's histograms use fixed buckets
--bucket-inter-token-latency | many | radixserve's histograms use fixed buckets
--bucket-e2e-request-latency | many | radixserve's histograms use fixed buckets
--collect-tokens-histogram | none | token-count histograms are not exported (deprecated in SGLang too)
--prompt-tokens-buckets | many | token-count histograms are not exported
--generation-tokens-buckets | many | token-count histograms are not exported
--gc-warning-threshold-secs | one | long-GC warnings are not logged (logs only)
--decode-log-interval | one | radixserve logs decode statistics on its own schedule
--enable-request-time-stats-logging | none | per-request time stats are in --log-requests lines and traces
--export-metrics-to-file-dir | one | only used with --export-metrics-to-file, which radixserve refuses
--weight-version | one | weight versions are not tracked (no weight updates); responses carry none
--enable-cache-report | none | usage.prompt_tokens_details.cached_tokens is always reported
--enable-lora-overlap-loading | none | adapters are copied to their GPU slot in the step that needs them (no overlap yet)
--lora-eviction-policy | one | GPU adapter slots are always evicted least recently used first
--max-lora-chunk-size | one | the triton LoRA kernels run per token (no chunk size)
--lora-drain-wait-threshold | one | requests of non-resident adapters wait behind resident ones (no drain threshold)
--sampling-backend | one | radixserve samples with its own torch sampler; the kernel choice does not change results
--mm-attention-backend | one | multimodal inputs are not supported (text-only models); no effect on them
--dsa-prefill-backend,--nsa-prefill-backend,--nsa-prefill | one | DeepSeek sparse-attention (DSA/NSA) models are not supported; no effect on supported models
--dsa-decode-backend,--nsa-decode-backend,--nsa-decode | one | DeepSeek sparse-attention (DSA/NSA) models are not supported; no effect on supported models
--fp8-gemm-backend | one | no FP8 GEMMs run (FP8 quantization is refused)
--fp4-gemm-backend | one | no FP4 GEMMs run (FP4 quantization is refused)
--disable-flashinfer-autotune | none | FlashInfer is not used, so there is nothing to autotune
--speculative-draft-model-revision | one | the draft head (a folder, or a hub id at its default revision) is read as --speculative-draft-model-path names it
--speculative-draft-load-format | one | the draft head loads its safetensors (or pytorch_model.bin) as they are
--speculative-accept-threshold-single | one | drafts are verified exactly (argmax or rejection sampling): no relaxed acceptance
--speculative-accept-threshold-acc | one | drafts are verified exactly (argmax or rejection sampling): no relaxed acceptance
--speculative-token-map | one | an EAGLE3 head's own d2t maps its vocabulary (a separate token map is not read)
--speculative-attention-mode | one | the draft head runs with the target's --attention-backend
--speculative-draft-attention-backend | one | the draft head runs with the target's --attention-backend
--speculative-moe-runner-backend | one | EAGLE draft heads are dense (no MoE runner)
--speculative-moe-a2a-backend | one | EAGLE draft heads are dense (no MoE all-to-all)
--speculative-draft-model-quantization | one | the draft head runs unquantized, in the target's dtype
--speculative-ngram-min-bfs-breadth | one | SGLang's shared n-gram trie; radixserve's NGRAM drafts from each request's own tokens (one chain, or a tree with --speculative-ngram-max-bfs-breadth; docs/speculative.md)
--speculative-ngram-match-type | one | SGLang's shared n-gram trie; radixserve's NGRAM drafts from each request's own tokens (one chain, or a tree with --speculative-ngram-max-bfs-breadth; docs/speculative.md)
--speculative-ngram-max-trie-depth | one | SGLang's shared n-gram trie; radixserve's NGRAM drafts from each request's own tokens (one chain, or a tree with --speculative-ngram-max-bfs-breadth; docs/speculative.md)
--speculative-ngram-capacity | one | SGLang's shared n-gram trie; radixserve's NGRAM drafts from each request's own tokens (one chain, or a tree with --speculative-ngram-max-bfs-breadth; docs/speculative.md)
--enable-multi-layer-eagle | none | multi-layer EAGLE (MTP) heads are not built; EAGLE heads run their layers as one draft step
--moe-runner-backend | one | radixserve runs its own fused Triton MoE kernel; the MoE runner choice does not change results
--flashinfer-mxfp4-moe-precision | one | no MXFP4 MoE runs (MXFP4 quantization is refused)
--enable-flashinfer-allreduce-fusion | none | fused all-reduce kernels only change speed; radixserve uses NCCL all-reduce
--enable-aiter-allreduce-fusion | none | fused all-reduce kernels only change speed (AMD aiter is not used)
--deepep-mode | one | only used with --moe-a2a-backend deepep, which radixserve refuses
--deepep-dispatcher-output-dtype | one | only used with --moe-a2a-backend deepep, which radixserve refuses
--enable-fused-grouped-gemm-combine | none | only used with DeepEP and modelopt_fp4, which radixserve refuses
--ep-dispatch-algorithm | one | only used with redundant experts / EPLB, which radixserve refuses
--eplb-algorithm | one | only used with --enable-eplb, which radixserve refuses
--eplb-rebalance-num-iterations | one | only used with --enable-eplb, which radixserve refuses
--eplb-rebalance-layers-per-chunk | one | only used with --enable-eplb, which radixserve refuses
--eplb-min-rebalancing-utilization-threshold | one | only used with --enable-eplb, which radixserve refuses
--expert-distribution-recorder-mode | one | expert distribution recording is not available (statistics only)
--expert-distribution-recorder-buffer-size | one | expert distribution recording is not available (statistics only)
--enable-expert-distribution-metrics | none | expert balancedness metrics are not exported
--deepep-config | one | only used with --moe-a2a-backend deepep, which radixserve refuses
--enable-elastic-expert-backup | none | only used with --elastic-ep-backend, which radixserve refuses
--mooncake-ib-device | one | only used with Mooncake backends, which radixserve refuses
--max-mamba-cache-size | one | no supported model has Mamba/SSM layers, so there is no Mamba state cache
--mamba-ssm-dtype | one | no supported model has Mamba/SSM layers, so there is no Mamba state cache
--mamba-full-memory-ratio | one | no supported model has Mamba/SSM layers, so there is no Mamba state cache
--mamba-scheduler-strategy,--mamba-radix-cache-strategy | one | no supported model has Mamba/SSM layers, so there is no Mamba state cache
--mamba-track-interval | one | no supported model has Mamba/SSM layers, so there is no Mamba state cache
--hicache-ratio | one | only used with --enable-hierarchical-cache, which radixserve refuses
--hicache-size | one | only used with --enable-hierarchical-cache, which radixserve refuses
--hicache-write-policy | one | only used with --enable-hierarchical-cache, which radixserve refuses
--hicache-io-backend | one | only used with --enable-hierarchical-cache, which radixserve refuses
--hicache-mem-layout | one | only used with --enable-hierarchical-cache, which radixserve refuses
--hicache-storage-backend | one | only used with --enable-hierarchical-cache, which radixserve refuses
--hicache-storage-prefetch-policy | one | only used with --enable-hierarchical-cache, which radixserve refuses
--hicache-storage-backend-extra-config | one | only used with --enable-hierarchical-cache, which radixserve refuses
--kt-method | one | only used with --kt-weight-path (KTransformers), which radixserve refuses
--kt-cpuinfer | one | only used with --kt-weight-path (KTransformers), which radixserve refuses
--kt-threadpool-count | one | only used with --kt-weight-path (KTransformers), which radixserve refuses
--kt-num-gpu-experts | one | only used with --kt-weight-path (KTransformers), which radixserve refuses
--kt-max-deferred-experts-per-token | one | only used with --kt-weight-path (KTransformers), which radixserve refuses
--dllm-algorithm-config | one | only used with --dllm-algorithm, which radixserve refuses
--offload-num-in-group | one | only used with --offload-group-size (layer offload), which radixserve refuses
--offload-prefetch-step | one | only used with --offload-group-size (layer offload), which radixserve refuses
--offload-mode | one | only used with --offload-group-size (layer offload), which radixserve refuses
--disable-prefill-cuda-graph | none | radixserve runs prefill eagerly; there are no prefill CUDA graphs to disable
--disable-cuda-graph-padding | none | padded decode batches replay captured graphs; results are the same
--enable-profile-cuda-graph | none | CUDA graph capture profiling is not available (profiling only)
--enable-cudagraph-gc | none | garbage-collection tuning during graph capture only
--enable-layerwise-nvtx-marker | none | NVTX markers are not emitted (profiling only)
--enable-nccl-nvls | none | NCCL algorithm tuning only; results are the same
--enable-symm-mem | none | NCCL symmetric memory is not used; collectives give the same results
--disable-flashinfer-cutlass-moe-fp4-allgather | none | no FP4 MoE runs (FP4 quantization is refused)
--enable-tokenizer-batch-encode | none | tokenization batching only; the same token ids result
--disable-tokenizer-batch-decode | none | detokenization batching only; the same text results
--disable-outlines-disk-cache | none | outlines is not used (radixserve uses xgrammar)
--disable-custom-all-reduce | none | radixserve always uses NCCL all-reduce (no custom all-reduce kernel)
--enable-mscclpp | none | mscclpp is not used; radixserve uses NCCL all-reduce
--enable-torch-symm-mem | none | torch symmetric-memory all-reduce is not used; radixserve uses NCCL
--enable-dp-lm-head | none | only used with --enable-dp-attention, which radixserve refuses
--enable-two-batch-overlap | none | only works with DeepEP or DP attention, which radixserve refuses
--enable-single-batch-overlap | none | only works with DeepEP or DP attention, which radixserve refuses
--tbo-token-distribution-threshold | one | only used with --enable-two-batch-overlap, which has no effect here
--enable-torch-compile-debug-mode | none | SGLang's compile debug switch; torch.compile's own logs (TORCH_LOGS) show the same
--disable-piecewise-cuda-graph | none | radixserve runs prefill eagerly; there are no piecewise CUDA graphs to disable
--piecewise-cuda-graph-tokens,--cuda-graph-bs-prefill | many | radixserve runs prefill eagerly (no piecewise CUDA graphs)
--piecewise-cuda-graph-compiler,--cuda-graph-tc-compiler | one | radixserve runs prefill eagerly (no piecewise CUDA graphs)
--piecewise-cuda-graph-max-tokens,--cuda-graph-max-bs-prefill | one | radixserve runs prefill eagerly (no piecewise CUDA graphs)
--enable-p2p-check | none | radixserve does not test GPU peer access; NCCL chooses the transport
--triton-attention-reduce-in-fp32 | none | radixserve's Triton attention always accumulates and reduces in fp32
--triton-attention-num-kv-splits | one | radixserve's split-KV decode picks its own number of splits; results agree up to rounding
--triton-attention-split-tile-size | one | only used with --enable-deterministic-inference, which radixserve refuses
--enable-weights-cpu-backup | none | only used with --enable-memory-saver, which radixserve refuses
--enable-draft-weights-cpu-backup | none | only used with speculative decoding and --enable-memory-saver, both refused
--flashinfer-mla-disable-ragged | none | MLA models (DeepSeek) are not supported; no effect on supported models
--disable-shared-experts-fusion | none | radixserve does not fuse shared experts; results are the same
--disable-chunked-prefix-cache | none | MLA models (DeepSeek) are not supported; no effect on supported models
--disable-fast-image-processor | none | multimodal inputs are not supported (text-only models); no effect on them
--keep-mm-feature-on-device | none | multimodal inputs are not supported (text-only models); no effect on them
--scheduler-recv-interval | one | the scheduler takes requests as they arrive on gRPC; there is no polling interval
--numa-node | many | NUMA binding is not applied (placement only; outputs unchanged)
--enable-attn-tp-input-scattered | none | attention input scattering only changes speed; results are the same
--enable-dsa-prefill-context-parallel,--enable-nsa-prefill-context-parallel | none | DeepSeek V3.2 (DSA) models are not supported; no effect on supported models
--dsa-prefill-cp-mode,--nsa-prefill-cp-mode | one | DeepSeek V3.2 (DSA) models are not supported; no effect on supported models
--enable-fused-qk-norm-rope | none | kernel fusion only; results are the same
--enable-precise-embedding-interpolation | none | multimodal inputs are not supported (text-only models); no effect on them
--enable-dynamic-batch-tokenizer | none | tokenization batching only; the same token ids result
--dynamic-batch-tokenizer-batch-size | one | tokenization batching only; the same token ids result
--dynamic-batch-tokenizer-batch-timeout | one | tokenization batching only; the same token ids result
--debug-tensor-dump-output-folder | one | tensor dumps are not written (debugging only)
--debug-tensor-dump-layers | many | tensor dumps are not written (debugging only)
--disaggregation-transfer-backend | one | only used with --disaggregation-mode prefill|decode, which radixserve refuses
--disaggregation-bootstrap-port | one | only used with --disaggregation-mode prefill|decode, which radixserve refuses
--disaggregation-ib-device | one | only used with --disaggregation-mode prefill|decode, which radixserve refuses
--disaggregation-decode-enable-offload-kvcache | none | only used with --disaggregation-mode prefill|decode, which radixserve refuses
--num-reserved-decode-tokens | one | only used with --disaggregation-mode prefill|decode, which radixserve refuses
--disaggregation-decode-polling-interval | one | only used with --disaggregation-mode prefill|decode, which radixserve refuses
--language-only | none | multimodal models are not supported; text models load as usual
--encoder-transfer-backend | one | only used with encoder disaggregation, which radixserve does not support
--encoder-urls | many | only used with encoder disaggregation, which radixserve does not support
--weight-loader-disable-mmap | none | weight loading I/O detail only; the same weights result
--weight-loader-prefetch-checkpoints | none | weight loading I/O detail only; the same weights result
--weight-loader-prefetch-num-threads | one | weight loading I/O detail only; the same weights result
--remote-instance-weight-loader-seed-instance-ip | one | only used with --load-format remote_instance, which radixserve refuses
--remote-instance-weight-loader-seed-instance-service-port | one | only used with --load-format remote_instance, which radixserve refuses
--remote-instance-weight-loader-send-weights-group-ports | one | only used with --load-format remote_instance, which radixserve refuses
--remote-instance-weight-loader-backend | one | only used with --load-format remote_instance, which radixserve refuses
--pdmux-config-path | one | only used with --enable-pdmux, which radixserve refuses
--sm-group-num | one | only used with --enable-pdmux, which radixserve refuses
--mm-max-concurrent-calls | one | multimodal inputs are not supported (text-only models); no effect on them
--mm-per-request-timeout | one | multimodal inputs are not supported (text-only models); no effect on them
--enable-broadcast-mm-inputs-process | none | multimodal inputs are not supported (text-only models); no effect on them
--mm-process-config | one | multimodal inputs are not supported (text-only models); no effect on them
--mm-enable-dp-encoder | none | multimodal inputs are not supported (text-only models); no effect on them
--limit-mm-data-per-request | one | multimodal inputs are refused outright, which is stricter than any limit
--enable-mm-global-cache | none | multimodal inputs are not supported (text-only models); no effect on them
--decrypted-draft-config-file | one | the draft head's config.json is read as it is (no encrypted configs)
--enable-prefix-mm-cache | none | multimodal inputs are not supported (text-only models); no effect on them
--msprobe-dump-config | one | msProbe dumps (Ascend NPU debugging) are not written
--prefill-round-robin-balance | none | deprecated in SGLang, where it has no effect either
--enable-flashinfer-cutlass-moe | none | radixserve runs its own fused Triton MoE kernel; the MoE runner choice does not change results
--enable-flashinfer-cutedsl-moe | none | radixserve runs its own fused Triton MoE kernel; the MoE runner choice does not change results
--enable-flashinfer-trtllm-moe | none | radixserve runs its own fused Triton MoE kernel; the MoE runner choice does not change results
--enable-triton-kernel-moe | none | radixserve runs its own fused Triton MoE kernel; the MoE runner choice does not change results
--enable-flashinfer-mxfp4-moe | none | radixserve runs its own fused Triton MoE kernel; the MoE runner choice does not change results
--hybrid-kvcache-ratio | one | radixserve keeps one full KV pool for every layer; there is no hybrid pool to size
--load-watch-interval | one | the gateway tracks replica load per request; there is no polling interval
--uvicorn-log-level | one | HTTP server logs follow --log-level
""")

# Refused at start (exit 2): `spellings | arity | message`.
REFUSED = _table("""
--fastapi-root-path | one | not supported yet: serve at the root and let the proxy strip the path prefix
--grpc-mode,--smg-grpc-mode | none | SGLang's gRPC server mode is not supported; radixserve serves HTTP and its own gRPC API (--gateway-grpc-port) together
--grpc-port | one | SGLang's native gRPC API is not served; radixserve's gRPC API listens on --gateway-grpc-port
--enable-http2 | none | HTTP/2 not supported yet: clients must use HTTP/1.1
--ssl-keyfile | one | HTTPS not supported yet: terminate TLS in a reverse proxy in front of radixserve
--ssl-certfile | one | HTTPS not supported yet: terminate TLS in a reverse proxy in front of radixserve
--ssl-ca-certs | one | HTTPS not supported yet: terminate TLS in a reverse proxy in front of radixserve
--ssl-keyfile-password | one | HTTPS not supported yet: terminate TLS in a reverse proxy in front of radixserve
--enable-ssl-refresh | none | HTTPS not supported yet: terminate TLS in a reverse proxy in front of radixserve
--checkpoint-engine-wait-weights-before-ready | none | weight updates through checkpoint-engine are not supported yet; the server serves the weights it loaded
--enable-fp32-lm-head | none | not supported yet: the LM head runs in the model dtype (logits are then cast to fp32)
--modelopt-quant | one | ModelOpt quantization not supported yet: serve an unquantized checkpoint
--modelopt-checkpoint-restore-path | one | ModelOpt quantization not supported yet
--modelopt-checkpoint-save-path | one | ModelOpt quantization not supported yet
--modelopt-export-path | one | ModelOpt quantization not supported yet
--quantize-and-serve | none | ModelOpt quantization not supported yet: serve an unquantized checkpoint
--enable-quant-communications | none | INT8 quantized TP communication not supported (NPU-only in SGLang); all-reduces run in the model dtype
--prefill-max-requests | one | a cap on requests per prefill batch is not supported yet
--enable-priority-scheduling | none | priority scheduling not supported yet: requests run in --schedule-policy order
--abort-on-priority-when-disabled | none | request priorities are not supported yet
--incremental-streaming-output,--stream-output | none | not supported yet: /generate streams cumulative text (SGLang's default)
--model-checksum | one | model file checksum verification not supported yet (SGLang: value optional)
--kv-events-config | one | KV cache event publishing (NVIDIA Dynamo) not supported yet
--export-metrics-to-file | none | per-request metric files not supported yet: use --enable-metrics or --log-requests
--admin-api-key | one | a separate admin key is not supported yet: use --api-key, which guards every route
--hf-chat-template-name | one | selecting a named tokenizer template is not supported yet: pass that template with --chat-template
--completion-template | one | code-completion (FIM) templates not supported yet
--tool-server | one | built-in tool servers not supported yet
--default-chat-template-kwargs | one | chat template kwargs are not supported yet
--enable-eplb | none | expert load balancing (EPLB) not supported yet
--enable-deepep-waterfill,--enable-waterfill | none | DeepEP waterfill not supported yet (DeepEP is not supported)
--elastic-ep-rejoin | none | elastic expert parallelism not supported yet
--enable-hierarchical-cache | none | hierarchical (host-memory) KV cache not supported yet
--hierarchical-sparse-attention-extra-config,--hisparse-config | one | hierarchical sparse attention not supported yet
--enable-hisparse | none | hierarchical sparse attention not supported yet
--enable-lmcache | none | LMCache KV offload not supported yet
--kt-weight-path | one | KTransformers CPU expert offload not supported yet
--dllm-algorithm | one | diffusion LLM inference not supported yet
--multi-item-scoring-delimiter | one | multi-item scoring not supported yet
--enable-dp-attention | none | DP attention not supported yet: use --dp-size for independent replicas
--enforce-piecewise-cuda-graph | none | piecewise (prefill) CUDA graphs not supported yet
--torchao-config | one | torchao quantization not supported yet
--enable-nan-detection | none | NaN detection (and replacement of NaN logits) not supported yet
--delete-ckpt-after-loading | none | not supported: radixserve never deletes model files
--enable-memory-saver | none | release/resume memory occupation not supported yet
--enable-custom-logit-processor | none | custom logit processors not supported: code sent in requests is never run
--enable-return-hidden-states | none | returning hidden states not supported yet
--enable-return-routed-experts | none | returning routed experts not supported yet
--enable-deterministic-inference | none | deterministic (batch-invariant) inference not supported yet
--rl-on-policy-target | one | RL on-policy numerics matching not supported yet
--debug-tensor-dump-input-file | one | tensor-dump replay runs are not supported
--debug-tensor-dump-inject | one | injecting layer inputs is not supported
--encoder-only | none | encoder-only (multimodal encoder) servers not supported yet
--custom-weight-loader | many | custom weight loaders not supported: no Python code named by flags is run
--remote-instance-weight-loader-start-seed-via-transfer-engine | none | serving weights to other instances is not supported yet
--enable-pdmux | none | PD-Multiplexing not supported yet
--decrypted-config-file | one | encrypted checkpoints not supported yet
--forward-hooks | one | forward hooks not supported: no Python code named by flags is run
--enable-deepep-moe | none | DeepEP not supported yet (SGLang now spells it --moe-a2a-backend deepep)
--crash-on-nan | one | crashing on NaN logprobs not supported yet
""")


class _Ignore(argparse.Action):
    """Accepts the flag (and its values), remembering it for one warning after parsing."""

    def __init__(self, *args, reason: str, **kwargs):
        self.reason = reason
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, IGNORED_KEY, None) or []
        seen.append((option_string, self.reason))
        setattr(namespace, IGNORED_KEY, seen)


class _Refuse(argparse.Action):
    """Stops the start (exit 2) with the reason."""

    def __init__(self, *args, reason: str, **kwargs):
        self.reason = reason
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"{parser.prog}: error: {option_string}: {self.reason}\n")


class _Fixed(argparse.Action):
    """Accepts the value radixserve has; refuses (exit 2) any other. <tp_size> is checked after parsing."""

    def __init__(self, *args, flag: ForeignFlag, **kwargs):
        self.flag = flag
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.flag.arity == "none":
            return
        if self.flag.honoured == ("<tp_size>",):
            fixed = getattr(namespace, FIXED_KEY, None) or {}
            fixed[option_string] = values
            setattr(namespace, FIXED_KEY, fixed)
            return
        if str(values) not in self.flag.honoured:
            parser.exit(
                2,
                f"{parser.prog}: error: {option_string} {values}: {self.flag.reason} "
                f"(honoured here: {', '.join(self.flag.honoured)})\n",
            )


def _store_many(dest: str, pick):
    """An action storing pick(values) into dest (e.g. the largest of --cuda-graph-bs)."""

    class _Store(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            setattr(namespace, dest, pick(values))

    return _Store


class _MaxNumBatchedTokens(argparse.Action):
    """vLLM's --max-num-batched-tokens: the most tokens one step runs, i.e. the prefill chunk and budget."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.chunked_prefill_size = values
        namespace.max_prefill_tokens = values


class _PhaseBackend(argparse.Action):
    """--prefill-attention-backend / --decode-attention-backend: one backend serves both phases here."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, "attention_backend", None)
        if values not in ("triton", "torch_native"):
            parser.exit(
                2,
                f"{parser.prog}: error: {option_string} {values}: not available here; use triton (CUDA) "
                "or torch_native\n",
            )
        if current not in (None, values):
            parser.exit(
                2,
                f"{parser.prog}: error: {option_string} {values}: one attention backend serves prefill "
                f"and decode here, and --attention-backend is {current}\n",
            )
        namespace.attention_backend = values


class _CudaGraphBackendDecode(argparse.Action):
    """--cuda-graph-backend-decode full (CUDA graphs, the default) | disabled (eager)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values == "disabled":
            namespace.disable_cuda_graph = True
        elif values != "full":
            parser.exit(
                2,
                f"{parser.prog}: error: {option_string} {values}: only full decode CUDA graphs "
                "(or disabled) are supported here\n",
            )


_NARGS = {"none": 0, "one": None, "many": "+"}


def add_foreign_flags(parser: argparse.ArgumentParser) -> None:
    """Register the mapped, fixed, ignored and refused flags (hidden from --help)."""
    hidden, unset = argparse.SUPPRESS, argparse.SUPPRESS

    def const(flags, dest, value):
        parser.add_argument(
            *flags, dest=dest, action="store_const", const=value, default=unset, help=hidden
        )

    # MAPPED onto ServerArgs fields: vLLM's spellings and SGLang's per-phase variants.
    const(["--enforce-eager", "--disable-decode-cuda-graph"], "disable_cuda_graph", True)
    const(["--enable-prefix-caching"], "disable_radix_cache", False)
    const(["--no-enable-prefix-caching"], "disable_radix_cache", True)
    const(["--enable-expert-parallel", "-ep"], VLLM_EP_KEY, True)  # see after_parse
    const(["--enable-log-requests"], "log_requests", True)
    const(["--disable-log-requests"], "log_requests", False)
    parser.add_argument(
        "--max-num-batched-tokens",
        dest="max_prefill_tokens",
        type=_int,
        action=_MaxNumBatchedTokens,
        default=unset,
        help=hidden,
    )
    parser.add_argument(
        "--cuda-graph-bs",
        "--cuda-graph-bs-decode",
        dest="cuda_graph_max_bs",
        type=int,
        nargs="+",
        action=_store_many("cuda_graph_max_bs", max),
        default=unset,
        help=hidden,
    )
    parser.add_argument(
        "--prefill-attention-backend",
        "--decode-attention-backend",
        dest="attention_backend",
        action=_PhaseBackend,
        default=unset,
        help=hidden,
    )
    parser.add_argument(
        "--cuda-graph-backend-decode",
        dest="disable_cuda_graph",
        action=_CudaGraphBackendDecode,
        default=unset,
        help=hidden,
    )
    for flag in FIXED:
        parser.add_argument(
            *flag.spellings,
            dest=_dest(flag),
            nargs=_NARGS[flag.arity],
            action=_Fixed,
            flag=flag,
            default=unset,
            help=hidden,
        )
    for table, action in ((IGNORED, _Ignore), (REFUSED, _Refuse)):
        for flag in table:
            parser.add_argument(
                *flag.spellings,
                dest=_dest(flag),
                nargs=_NARGS[flag.arity],
                action=action,
                reason=flag.reason,
                default=unset,
                help=hidden,
            )


def _int(value: str) -> int:
    from radixserve.common.args import human_int

    return human_int(value)


def _dest(flag: ForeignFlag) -> str:
    return "_foreign_" + flag.spellings[0].lstrip("-").replace("-", "_")


def after_parse(ns: argparse.Namespace, args):
    """The foreign flags that depend on other flags, once all are parsed: (args, None) or (args, why refused).
    A FIXED flag whose honoured value is <tp_size> must equal it; vLLM's --enable-expert-parallel splits the
    experts over the tensor-parallel shards, as --enable-ep-moe, but vLLM spreads them over its data-parallel
    ranks too, which replicas here do not do."""
    import dataclasses

    for option, value in (getattr(ns, FIXED_KEY, None) or {}).items():
        if str(value) != str(args.tp_size):
            return args, (
                f"{option} {value}: dense layers are split over all --tp-size shards ({args.tp_size}); "
                "another split is not supported yet"
            )
    if getattr(ns, VLLM_EP_KEY, False):
        if args.dp_size > 1:
            return args, (
                "--enable-expert-parallel with --data-parallel-size > 1: experts spread over data-parallel "
                "replicas are not supported yet; each replica's experts are split over its --tp-size shards "
                "with --enable-ep-moe"
            )
        args = dataclasses.replace(args, enable_ep_moe=True, ep_size=args.tp_size)
    return args, None


def warn_ignored(ns: argparse.Namespace, prog: str = "radixserve") -> list[str]:
    """Print one warning line per ignored flag given (stderr); return the lines."""
    lines = [
        f"{prog}: warning: {flag} has no effect here: {reason}"
        for flag, reason in getattr(ns, IGNORED_KEY, None) or []
    ]
    for line in lines:
        print(line, file=sys.stderr)
    return lines
