"""ModelRunner: loads the model, allocates the KV pool and applies steps. Pure Python + torch.

Under tensor parallelism every shard builds a ModelRunner over its slice of the model and KV heads and
runs every step (see step_broadcast.py); shards agree on the KV slot count, and only rank 0 samples.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from dataclasses import dataclass, field

import torch

from radixserve.executor.host_copy import to_device, to_host
from radixserve.common.args import ServerArgs
from radixserve.common.config import MAX_RUNNING_REQUESTS_CAP, RunnerConfig
from radixserve.common.draft_tree import spare_rows
from radixserve.common.phase_clock import PhaseClock
from radixserve.executor.attention.metadata import StepSamples, forward_context
from radixserve.executor.attention.registry import create_attention_backend
from radixserve.executor.batch_builder import BatchBuilder
from radixserve.executor.eagle_step import EagleStep
from radixserve.executor.fast_decode import FastDecode
from radixserve.executor.image_inputs import ImageInputs
from radixserve.executor.kv_cache import KVPool, compute_kv_slots, kv_bytes_per_token
from radixserve.executor.kv_scales import (
    is_fp8,
    kv_cache_dtype_name,
    kv_cache_torch_dtype,
    resolve_kv_scales,
    split_checkpoint_scales,
)
from radixserve.executor.logits_processors import LogitsProcessor, step_bitmasks
from radixserve.executor.lora.adapter import LoraDisabled
from radixserve.executor.lora.manager import build_lora_manager, check_no_lora
from radixserve.executor.prompt_logprobs import DevicePromptLogprobs, compute_prompt_logprobs
from radixserve.executor.model_config import ModelConfig, dtype_name, resolve_device
from radixserve.executor.models.bert import BertModel
from radixserve.executor.models.pooling_heads import PoolingOnly
from radixserve.executor.models.registry import get_model_class
from radixserve.executor.parallel_state import (
    agree_int,
    broadcast_from_rank0,
    tp_local_size,
    tp_rank,
)
from radixserve.executor.request_state import RequestState
from radixserve.executor.sampling import DeviceSample, sample_on_device
from radixserve.executor.slot_table import SlotTable
from radixserve.executor.spec_step import DeviceSpecSample, next_tokens, verify_on_device
from radixserve.executor.spec_verify import DeviceVerify
from radixserve.common.step import SampledToken, StepInput, StepOutput
from radixserve.executor.quantization import building_with as quantized_linears
from radixserve.executor.quantization import resolve as resolve_quantization
from radixserve.executor.quantization import unquantize_skipped
from radixserve.executor.quantization import weight_bytes
from radixserve.executor.quantization.gguf import native_config as native_gguf
from radixserve.executor.weights import default_dtype, init_dummy_weights, iterate_safetensors
from radixserve.scheduler.speculation import EagleParams, drafts_trees, speculation_params

log = logging.getLogger("radixserve.executor.runner")


@dataclass
class LaunchedStep:
    """A step queued on the device (ModelRunner.launch), to be read back by ModelRunner.collect."""

    step_id: int
    t0: float  # when launch began (perf_counter)
    request_ids: list[str]  # the requests that sample, in output order
    sampled: DeviceSample | None = None  # rank 0's tokens (and logprobs), on their way to the host
    done: torch.cuda.Event | None = None  # recorded after the step's last kernel (CUDA)
    logits: torch.Tensor | None = None  # a copy, when the runner keeps logits
    prompt_logprobs: list[DevicePromptLogprobs] | None = None  # rank 0's
    # A verify step (speculative decoding): rank 0's verified tokens, and on every shard the states
    # whose drafts it verifies with their draft counts and the accepted counts (on their way to the
    # host), for collect() to take the rejected drafts off their lengths.
    spec: DeviceSpecSample | None = None
    verifying: list[tuple[RequestState, int]] | None = None
    num_accepted: torch.Tensor | None = None
    # A verify step's tokens [V, K + 1] and accepted counts [V] (trees: and the accepted paths' rows)
    # on the device (every shard's), which an EAGLE head reads there (_propose), the host only in
    # collect.
    verified: DeviceVerify | None = None
    # EAGLE: the drafts proposed after this step, rank 0's: (request ids, their drafts [B, K] on the
    # device, and for trees their parents [B, K], else None).
    proposals: tuple[list[str], torch.Tensor, torch.Tensor | None] | None = None


@dataclass
class ModelInfo:
    """What GetModelInfo answers: the fields of ExecutorModelInfo."""

    architecture: str
    model_path: str
    context_length: int
    kv_slots: int
    vocab_size: int
    eos_token_ids: list[int]
    dtype: str
    device: str
    num_parameters: int
    kv_cache_dtype: str  # the KV pool's: the model's dtype, or fp8_e5m2 / fp8_e4m3
    kv_bytes_per_token: int  # K and V of one token over every layer, on this shard
    max_loras_per_batch: int = 0  # LoRA GPU slots; 0: LoRA off
    lora_adapters: list[dict] = field(default_factory=list)  # ExecutorLoraAdapter fields
    max_graph_tokens: int = 0  # the largest CUDA graph's decode rows; 0: no graphs
    max_tree_draft_tokens: int = 0  # the slot table's spare rows for tree drafts; 0: none


def load_model(
    cfg: ModelConfig,
    device: torch.device,
    load_format: str,
    seed: int | None,
    quantization: str | None = None,
) -> torch.nn.Module:
    """The model of cfg's architecture in cfg.dtype on device, weights from cfg.path (or random: dummy);
    its linear layers quantized as --quantization and the checkpoint's quantization_config say. The
    checkpoint's KV-cache scales (k_scale / v_scale tensors) are kept aside in
    model.checkpoint_kv_scales ({name: value}) for an fp8 KV pool."""
    t0 = time.perf_counter()
    quant = native_gguf(quantization, cfg.path, device, load_format) or resolve_quantization(
        quantization, cfg.hf
    )
    with torch.device(device), default_dtype(cfg.dtype), quantized_linears(quant):
        model = get_model_class(cfg.architecture)(cfg)
        unquantize_skipped(model, quant)
    model.quant_config = quant
    model.checkpoint_kv_scales = {}
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        own = None if quant is None else quant.weights(cfg)
        model.load_weights(
            split_checkpoint_scales(iterate_safetensors(cfg.path), model.checkpoint_kv_scales)
            if own is None
            else own
        )
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    if quant is not None and device.type == "cuda":
        # Weights replaced after loading (online quantization) leave their memory in the allocator's
        # cache, where the KV pool's sizing (mem_get_info) would count it as taken.
        torch.cuda.empty_cache()
    model.eval()
    log.info(
        "loaded %s (%s, %s weights%s, %.1f MB of weights) on %s in %.1fs",
        cfg.architecture,
        dtype_name(cfg.dtype),
        load_format,
        "" if quant is None else f", {quant.describe()}",
        weight_bytes(model) / 1e6,
        device,
        time.perf_counter() - t0,
    )
    return model


class ModelRunner:
    def __init__(
        self,
        model_path: str | os.PathLike,
        settings: RunnerConfig,
        *,
        keep_logits: bool = True,
        host_replicas: int = 1,
        clock: PhaseClock | None = None,
    ):
        """model_path: the model's folder (settings.model_path resolved). host_replicas: data-parallel replicas
        on this host (--dp-size); on the CPU they share its cores and memory with this one, as its
        tensor-parallel shards do. clock: times the start's phases."""
        cuda_graph_max_bs = 0 if settings.disable_cuda_graph else settings.cuda_graph_max_bs
        self.clock = clock = clock or PhaseClock()
        self.device = resolve_device(settings.device)
        # StepOutput.logits for callers that read them (tests, parity checks); the server does not.
        self.keep_logits = keep_logits
        if self.device.type == "cpu":
            # Shards on one host share its cores.
            torch.set_num_threads(
                max(1, (os.cpu_count() or 1) // (tp_local_size() * host_replicas))
            )
        # Rank 0 samples; the other shards only run the forward passes with it.
        self.samples = tp_rank() == 0
        self.config = ModelConfig.load(
            pathlib.Path(model_path), settings.dtype, settings.context_length
        )
        self.dtype = self.config.dtype
        with clock.phase("load weights"):
            self.model = self._load_model(
                settings.load_format, settings.random_seed, settings.quantization
            )
        # Summed over the shards (a replicated tensor, e.g. a norm, counts once per shard).
        self.num_parameters = agree_int(sum(p.numel() for p in self.model.parameters()), "sum")

        cfg = self.config
        # EAGLE / EAGLE3 / STANDALONE (None otherwise): the draft, its KV counted in the budget below.
        spec = speculation_params(settings)
        self.eagle = (
            EagleStep(
                spec,
                self.model,
                self.device,
                self.dtype,
                settings.download_dir,
                settings.load_format,
                settings.random_seed,
            )
            if isinstance(spec, EagleParams)
            else None
        )
        # LoRA adapters (None without --enable-lora): no fused CPU decode, torch.compile, or (with the
        # torch backend, which syncs with the host) CUDA graphs.
        self.lora = build_lora_manager(
            self.model, settings, self.device, self.dtype, cfg.num_layers
        )
        if self.lora is not None and settings.lora_backend == "torch":
            cuda_graph_max_bs = 0
        num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads  # this shard's
        self.kv_dtype = kv_cache_torch_dtype(settings.kv_cache_dtype, self.dtype)
        # A model whose cache rows are not K and V of head_dim (MLA: one latent row) says so.
        k_dim, v_dim = getattr(self.model, "kv_head_dims", (cfg.head_dim, cfg.head_dim))
        per_token = kv_bytes_per_token(cfg.num_layers, num_kv_heads, k_dim, self.kv_dtype, v_dim)
        if self.eagle is not None:
            per_token += self.eagle.kv_bytes_per_token  # its draft K/V at the same slot ids
        self.kv_bytes_per_token = per_token
        # CPU shards share the host's memory: size each for its share. Every shard must hold the same slots.
        sizing_per_token = per_token * (
            tp_local_size() * host_replicas if self.device.type == "cpu" else 1
        )
        with clock.phase("KV pool"):
            self.kv_slots = agree_int(
                compute_kv_slots(
                    sizing_per_token,
                    self.device,
                    settings.max_total_tokens,
                    settings.mem_fraction_static,
                ),
                "min",
            )
            self.kv_pool = KVPool(
                self.kv_slots,
                cfg.num_layers,
                num_kv_heads,
                k_dim,
                self.kv_dtype,
                self.device,
                self._kv_scales(settings),
                v_head_dim=v_dim,
            )
        log.info(
            "KV pool: %d slots (%.1f MiB), %s, %d bytes per token%s",
            self.kv_slots,
            self.kv_slots * per_token / 2**20,
            kv_cache_dtype_name(self.kv_dtype),
            per_token,
            f", scales from {self.kv_pool.scales.source}" if self.kv_pool.fp8 else "",
        )

        self.attn_backend = create_attention_backend(
            settings.attention_backend, self.device, num_kv_heads
        )
        max_requests = settings.max_running_requests or MAX_RUNNING_REQUESTS_CAP
        self.slot_table = SlotTable(
            max_requests,
            cfg.context_length,
            self.device,
            spare_rows=(
                spare_rows(max_requests, spec.max_draft_tokens, cfg.context_length)
                if drafts_trees(spec)
                else 0
            ),
        )
        if self.eagle is not None:
            self.eagle.build(self.kv_slots, self.slot_table.rows, self.attn_backend)
        # None: every step takes the torch path
        self.fast_decode = (
            FastDecode.build(self) if self.lora is None and self.eagle is None else None
        )
        self.batch_builder = BatchBuilder(
            self.kv_slots,
            cfg.vocab_size,
            cfg.context_length,
            self.slot_table,
            self.kv_pool,
            self.attn_backend,
        )
        self.cuda_graphs = None
        use_graphs = (
            cuda_graph_max_bs > 0
            and self.device.type == "cuda"
            and self.attn_backend.supports_cuda_graphs
        )
        # A graph row is a decode token; with speculation a request verifies as up to 1 + max drafts
        # rows (attention backends with verify_as_decode_rows), so verify steps replay the graphs too.
        rows_per_request = 1 + spec.max_draft_tokens if spec is not None else 1
        graph_max_bs = min(cuda_graph_max_bs, self.slot_table.rows * rows_per_request)
        # Compiled in the graph capture, else at warm-up.
        self.compiled_decode = (
            self._compiled_decode(settings.torch_compile_max_bs, use_graphs, graph_max_bs)
            if settings.enable_torch_compile and self.lora is None and self.eagle is None
            else None
        )
        # Under tensor parallelism every shard captures the same graphs, NCCL all-reduces included, and
        # replays them in the same order (each runs every step rank 0 broadcasts).
        if use_graphs:
            from radixserve.executor.cuda_graph_runner import CudaGraphRunner

            from radixserve.executor.eagle_graphs import DraftRoundGraphs

            with clock.phase("CUDA graphs"):
                self.cuda_graphs = self.graph_runner(CudaGraphRunner, graph_max_bs)
                if self.eagle is not None:  # a head's rounds 2..K (a STANDALONE model's: eager)
                    self.eagle.capture_rounds(
                        DraftRoundGraphs, graph_max_bs, self.slot_table.tensor.shape[1]
                    )
            if self.compiled_decode is not None:
                log.info("%s", self.compiled_decode.describe())
        self.states: dict[str, RequestState] = {}
        self.image_inputs = ImageInputs(self.model, self.device, cfg.context_length)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, cfg.eos_token_ids, self.device)
        self.generator = torch.Generator(device=self.device)
        if settings.random_seed is not None:
            self.generator.manual_seed(settings.random_seed)
        else:
            self.generator.seed()

    def graph_runner(self, kind, max_bs: int):
        """A kind (CudaGraphRunner, or a stand-in in tests) over this runner's model, pool and table:
        graphs for decode steps of up to max_bs rows. An EAGLE / EAGLE3 head reads the target's
        hidden states: the graphs keep them as outputs (a STANDALONE draft reads token ids)."""
        return kind(
            self.model,
            self.kv_pool,
            self.attn_backend,
            self.slot_table,
            max_bs,
            self.device,
            self.compiled_decode,
            lora=self.lora,
            keep_hidden=self.eagle is not None and self.eagle.reads_hidden_states,
        )

    @classmethod
    def from_args(cls, args: ServerArgs) -> "ModelRunner":
        from radixserve.common.model_files import resolve_model_path

        clock = PhaseClock()
        with clock.phase("resolve model"):
            folder = resolve_model_path(
                args.model_path,
                revision=args.revision,
                download_dir=args.download_dir,
                weights=args.load_format != "dummy",
            )
        return cls(folder, args, keep_logits=False, host_replicas=args.dp_size, clock=clock)

    def _compiled_decode(self, max_bs: int, use_graphs: bool, graph_max_bs: int):
        """The compiled decode forward: for the graph batch sizes up to max_bs under CUDA graphs,
        else for every size up to max_bs (None when no graph size is that small)."""
        from radixserve.executor.cuda_graph_runner import graph_buckets
        from radixserve.executor.torch_compile import CompiledDecode

        max_bs = min(max_bs, self.slot_table.rows)
        if not use_graphs:
            return CompiledDecode(self.model, max_bs, num_sizes=max_bs)
        sizes = [b for b in graph_buckets(graph_max_bs) if b <= max_bs]
        return CompiledDecode(self.model, sizes[-1], num_sizes=len(sizes)) if sizes else None

    def _load_model(
        self, load_format: str, seed: int | None, quantization: str | None
    ) -> torch.nn.Module:
        model_class = get_model_class(self.config.architecture)
        if issubclass(model_class, BertModel):
            raise ValueError(
                f"{self.config.architecture} is an encoder: serve it with --is-embedding"
            )
        if issubclass(model_class, PoolingOnly):
            raise ValueError(
                f"{self.config.architecture} has no LM head: serve it with --is-embedding"
            )
        return load_model(self.config, self.device, load_format, seed, quantization)

    def _kv_scales(self, settings: RunnerConfig):
        """The fp8 pool's per-layer scales (kv_scales.py's precedence); None for a pool in the
        model's dtype."""
        if not is_fp8(self.kv_dtype):
            if settings.quantization_param_path:
                log.warning(
                    "--quantization-param-path is unused: the KV cache is %s, not fp8",
                    kv_cache_dtype_name(self.kv_dtype),
                )
            return None
        return resolve_kv_scales(
            settings.quantization_param_path,
            self.model.checkpoint_kv_scales,
            self.config.num_layers,
            tp_rank(),
        )

    def model_info(self) -> ModelInfo:
        cfg = self.config
        return ModelInfo(
            cfg.architecture,
            str(cfg.path),
            cfg.context_length,
            self.kv_slots,
            cfg.vocab_size,
            list(cfg.eos_token_ids),
            dtype_name(self.dtype),
            str(self.device),
            self.num_parameters,
            kv_cache_dtype_name(self.kv_dtype),
            self.kv_bytes_per_token,
            self.lora.num_slots if self.lora is not None else 0,
            self.lora.describe() if self.lora is not None else [],
            self.cuda_graphs.max_bs if self.cuda_graphs is not None else 0,
            self.slot_table.spare_rows,
        )

    def load_lora(self, name: str, path: str) -> dict:
        """Load a LoRA adapter (LoraError if it cannot be served); its ExecutorLoraAdapter fields."""
        if self.lora is None:
            raise LoraDisabled("LoRA is off: start the executor with --enable-lora")
        adapter = self.lora.load(name, path)
        return {"name": adapter.name, "path": adapter.path, "rank": adapter.rank}

    def unload_lora(self, name: str) -> None:
        if self.lora is None:
            raise LoraDisabled("LoRA is off: start the executor with --enable-lora")
        self.lora.unload(name)

    def reset(self) -> int:
        dropped = len(self.states)
        self.states.clear()
        self.image_inputs.reset()
        self.logits_processor.reset()
        self.slot_table.reset()
        return dropped

    def _drop(self, request_id: str) -> None:
        self.image_inputs.drop(request_id)
        state = self.states.pop(request_id, None)
        if state is not None:
            self.logits_processor.release(state)
            self.slot_table.release(state.table_row)

    @property
    def launches_ahead(self) -> bool:
        """Whether launch() returns with the step still running on the device (CUDA). On the CPU it
        returns the finished step, so collect() has nothing left to wait for."""
        return self.device.type != "cpu"

    def step(self, step: StepInput) -> StepOutput:
        """Drop finished requests, run the step's tokens, sample, wait for the result. Raises StepError
        on invalid input."""
        return self.collect(self.launch(step))

    @torch.inference_mode()
    def launch(self, step: StepInput) -> LaunchedStep:
        """step up to its sampled tokens, queued on the device but not waited for: the next step may be
        launched before collect() reads this one (its decode inputs come from the device). Raises
        StepError on invalid input, before anything changes."""
        for rid in step.finished_request_ids:
            self._drop(rid)
        t0 = time.perf_counter()
        if not step.new_requests and not step.continuing_requests:
            return LaunchedStep(step.step_id, t0, [])
        if self.lora is None:
            check_no_lora(step)
        else:
            self.lora.check_step(step, self.states)
        images = self.image_inputs.prepare(step.new_requests)
        batch = self.batch_builder.build(step, self.states)
        self.image_inputs.admit(images)
        if self.lora is not None:
            self.lora.prepare_batch(batch)
        for req in step.new_requests if self.samples else ():
            self.logits_processor.register(self.states[req.request_id], req)
        all_logits = hidden = captured = None
        compute_logits = self.model.compute_logits
        input_embeds = (
            self.image_inputs.input_embeds(batch.input_ids, batch.seq_spans)
            if self.image_inputs.requests
            else None
        )
        if input_embeds is not None or self.image_inputs.uses_mrope:
            # Image rows or 3-row positions: the plain forward (graphs and fast paths take ids).
            positions = (
                self.image_inputs.positions(batch.positions, batch.seq_spans)
                if self.image_inputs.uses_mrope
                else batch.positions
            )
            with forward_context(batch):
                hidden = self.model(batch.input_ids, positions, input_embeds)
        # Prompt logprobs read hidden states, which a graph replay does not keep.
        elif (
            self.cuda_graphs is not None
            and not batch.prompt_logprobs
            and self.cuda_graphs.can_run(batch)
        ):
            replayed = self.cuda_graphs.replay(batch)
            all_logits, hidden, captured = replayed.logits, replayed.hidden, replayed.captured
        elif (
            self.cuda_graphs is None
            and self.compiled_decode is not None
            and self.compiled_decode.supports(batch)
        ):
            with forward_context(batch):
                all_logits = self.compiled_decode(batch.input_ids, batch.positions)
        elif self.fast_decode is not None and self.fast_decode.supports(batch):
            hidden = self.fast_decode.forward(batch)
            compute_logits = self.fast_decode.compute_logits
        else:
            with forward_context(batch):
                hidden = self.model(batch.input_ids, batch.positions)
        samples = batch.samples
        launched = LaunchedStep(
            step.step_id, t0, samples.request_ids if samples is not None else []
        )
        logits = None
        if samples is not None:
            if all_logits is None:
                rows = (
                    hidden if samples.every_token else hidden.index_select(0, samples.token_index)
                )
                logits = compute_logits(rows)
            else:
                logits = (
                    all_logits
                    if samples.every_token
                    else all_logits.index_select(0, samples.token_index)
                )
            if samples.num_drafts:
                self._verify(step, samples, logits, launched)
            else:
                launched.sampled = self._sample(step, samples, logits)
        if batch.prompt_logprobs:
            # Every shard runs the LM head (it gathers across them); rank 0 keeps the result.
            computed = compute_prompt_logprobs(
                hidden, batch.prompt_logprobs, self.model.compute_logits, self.config.vocab_size
            )
            launched.prompt_logprobs = computed if self.samples else None
        if self.eagle is not None:
            head_rows = self.eagle.head_rows(hidden, captured)
            launched.proposals = self._propose(step, batch, head_rows, launched)
        if self.keep_logits and logits is not None:
            launched.logits = (
                logits.clone()
            )  # the CUDA graph's output buffer, which the next replay overwrites
        if self.device.type == "cuda":
            launched.done = torch.cuda.Event()
            launched.done.record()
        return launched

    def _sample(
        self, step: StepInput, sampling: StepSamples, logits: torch.Tensor
    ) -> DeviceSample | None:
        """Sample (rank 0), hand the tokens to every shard and keep them for the next step's decode
        inputs; returns rank 0's sample with its copy to the host under way."""
        states = sampling.states
        drawn = None
        if self.samples:
            self.logits_processor.apply(logits, states, step_bitmasks(step, sampling.request_ids))
            drawn = sample_on_device(
                logits,
                [s.sampling for s in states],
                [s.generator_for_next_token() for s in states],
                self.generator,
            )
            self.logits_processor.record(states, drawn.tokens)
            tokens = drawn.tokens
        else:
            tokens = torch.empty(len(states), dtype=torch.int64, device=self.device)
        broadcast_from_rank0(tokens)
        self.slot_table.next_tokens.index_copy_(0, sampling.rows, tokens)
        return drawn.to_host() if drawn is not None else None

    def _verify(
        self, step: StepInput, sampling: StepSamples, logits: torch.Tensor, launched: LaunchedStep
    ) -> None:
        """_sample for a step with drafts: verify them (rank 0), hand every shard the verified
        tokens and keep each request's last one for its next decode. (A verify step replays the decode
        CUDA graphs where the attention backend takes its tokens as rows: verify_as_decode_rows.)"""
        states, counts = sampling.states, sampling.num_drafts
        starts = [sum(n + 1 for n in counts[:i]) for i in range(len(counts))]
        width = max(counts) + 1
        if self.samples:
            bitmasks = step_bitmasks(step, sampling.request_ids)
            if self.logits_processor.num_active or bitmasks is not None:
                # Requests with drafts use no processor (validated), so each request's first row
                # is the one its options act on.
                first = to_device(starts, logits.device)
                own = logits.index_select(0, first)
                self.logits_processor.apply(own, states, bitmasks)
                logits.index_copy_(0, first, own)
            spec = verify_on_device(
                logits,
                counts,
                sampling.draft_ids,
                [s.sampling for s in states],
                [s.generator_for_next_token(s.length - n) for s, n in zip(states, counts)],
                self.generator,
                sampling.draft_parents,
            )
            tokens, accepted = spec.verified.tokens, spec.verified.num_accepted
            if sampling.draft_parents:
                self._keep_tree_paths(sampling, spec.verified)
            self.logits_processor.record(states, next_tokens(spec.verified))
        else:
            spec = None
            tokens = torch.empty(len(states), width, dtype=torch.int64, device=self.device)
            accepted = torch.empty(len(states), dtype=torch.int64, device=self.device)
        broadcast_from_rank0(tokens)
        broadcast_from_rank0(accepted)
        last = tokens.gather(1, accepted[:, None]).squeeze(1)
        self.slot_table.next_tokens.index_copy_(0, sampling.rows, last)
        for state in states:
            state.verifying = True
        launched.verifying = list(zip(states, counts))
        launched.spec = spec.to_host() if spec is not None else None
        # Every shard's copy of the outcome (rank 0's own, the others' broadcast): the head's input.
        launched.verified = spec.verified if spec is not None else DeviceVerify(tokens, accepted)
        launched.num_accepted = to_host(accepted)

    def _keep_tree_paths(self, sampling: StepSamples, verified: DeviceVerify) -> None:
        """Tree drafts: the accepted path's slots move into their request's row, right after the
        root (positions length + 1 ..), where the request's next steps read them; the row held the
        drafts' slots in draft order (batch_builder). Rank 0 only: tree drafts run on one shard."""
        rows, cols, index = [], [], []
        for b, (state, slots) in enumerate(zip(sampling.states, sampling.draft_slots)):
            first = state.length - len(slots)  # the root's position + 1
            rows += [state.table_row] * len(slots)
            cols += range(first, first + len(slots))
            index += [(b, j) for j in range(len(slots))]
        if not rows:
            return
        width = max(map(len, sampling.draft_slots))
        slots = to_device(
            [s + [0] * (width - len(s)) for s in sampling.draft_slots], self.device, torch.int64
        )
        # Path step j of request b (j < its accepted count) is its draft rows[b, j + 1] - 1; the
        # columns past the path keep the draft-order slots (unread: the length drops below them).
        nodes = (verified.rows[:, 1:] - 1).clamp(min=0, max=width - 1)
        on_path = torch.arange(width, device=self.device)[None, :] < verified.num_accepted[:, None]
        moved = torch.where(on_path, slots.gather(1, nodes), slots)
        flat = to_device(index, self.device, torch.int64)
        self.slot_table.write(
            to_device(rows, self.device, torch.int64),
            to_device(cols, self.device, torch.int64),
            moved[flat[:, 0], flat[:, 1]],
        )

    def _propose(
        self, step: StepInput, batch, head_rows: torch.Tensor | None, launched: LaunchedStep
    ) -> tuple[list[str], torch.Tensor, torch.Tensor | None] | None:
        """EAGLE: the draft head over the step's kept positions (eagle_step.py); rank 0 keeps the
        drafts. head_rows: what the head reads at each of the step's tokens (EagleStep.head_rows).
        A verify step's outcome stays on the device (no sync: eagle_step.py)."""
        verified = None
        if launched.verified is not None:
            verified = (launched.request_ids, launched.verified)
        proposals = self.eagle.after_step(
            step,
            batch,
            head_rows,
            self.slot_table.tensor,
            self.slot_table.next_tokens,
            verified,
        )
        return proposals if self.samples else None

    def collect(self, launched: LaunchedStep) -> StepOutput:
        """Wait for a launched step on the device and read its sampled tokens."""
        if launched.done is not None:
            launched.done.synchronize()
        outputs: list[SampledToken] = []
        if launched.verifying is not None:
            for (state, n), a in zip(launched.verifying, launched.num_accepted.tolist()):
                state.length -= n - a  # the rejected drafts' KV is left behind, unread
                state.verifying = False
        if launched.spec is not None:
            outputs = launched.spec.outputs(launched.request_ids)
        elif launched.sampled is not None:
            result = launched.sampled.result()
            outputs = [
                SampledToken(
                    rid,
                    result.token_ids[i],
                    result.logprobs[i],
                    result.top_logprobs[i],
                    result.token_ids_logprobs[i],
                )
                for i, rid in enumerate(launched.request_ids)
            ]
        if launched.proposals is not None:
            rids, drafts, parents = launched.proposals
            by_id = dict(zip(rids, drafts.tolist()))
            parents_by_id = dict(zip(rids, parents.tolist())) if parents is not None else {}
            for out in outputs:
                out.proposed_draft_ids = by_id.get(out.request_id, [])
                out.proposed_draft_parents = parents_by_id.get(out.request_id, [])
        return StepOutput(
            launched.step_id,
            outputs,
            (time.perf_counter() - launched.t0) * 1000,
            launched.logits,
            [p.read() for p in launched.prompt_logprobs or ()],
        )


def build_model_runner(args: ServerArgs) -> ModelRunner:
    return ModelRunner.from_args(args)
