"""The executor's LoRA adapters: which are loaded (host memory, up to --max-loaded-loras), which sit in
the GPU slots (up to --max-loras-per-batch), and each step's per-token slot ids.

A step may name at most as many distinct adapters as there are slots (the scheduler plans within it; the
executor refuses more with a StepError before anything changes). An adapter the step needs and no slot
holds is copied into a free slot, else into the least recently used slot that no request of the step
needs. The slot ids are a device tensor the LoRA layers read (LoraSlotsState); under CUDA graphs it is
a view of a fixed buffer the replay fills (graph_* methods), padding tokens at -1 (no adapter).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict

import torch
from torch import nn

from radixserve.executor.host_copy import to_device
from radixserve.common.config import MAX_LORA_RANK_LIMIT, LoraConfig, lora_name_problem
from radixserve.common.step import StepError, StepInput
from radixserve.executor.layers.linear import LinearBase
from radixserve.executor.lora.adapter import (
    TARGETS,
    LoraAdapter,
    LoraError,
    LoraNotFound,
    adapter_rank,
    parse_lora_paths,
    parse_target_modules,
    read_adapter,
)
from radixserve.executor.lora.layers import LoraLinear, LoraSlotsState

log = logging.getLogger("radixserve.executor.lora")

BASE_SLOT = -1  # the token runs the base model only


def check_no_lora(step: StepInput) -> None:
    """A server without --enable-lora refuses steps that name an adapter."""
    for r in step.new_requests:
        if r.lora_name:
            raise StepError(
                f"request {r.request_id} names LoRA adapter {r.lora_name!r} but LoRA is off "
                "(--enable-lora)"
            )


def build_lora_manager(model, settings: LoraConfig, device, dtype, num_layers):
    """The runner's LoraManager, None without --enable-lora / --lora-paths."""
    if not settings.lora_enabled:
        return None
    return LoraManager(model, settings, device, dtype, num_layers)


def max_loaded(settings: LoraConfig) -> int:
    """--max-loaded-loras, default 4 x --max-loras-per-batch (never below the slots, nor the
    adapters of --lora-paths)."""
    given = settings.max_loaded_loras
    at_start = len(parse_lora_paths(settings.lora_paths))
    return max(given or 4 * settings.max_loras_per_batch, settings.max_loras_per_batch, at_start)


def resolve_max_rank(settings: LoraConfig) -> int:
    """--max-lora-rank, else the largest rank of the --lora-paths adapters, else the limit."""
    rank = settings.max_lora_rank
    if rank is None:
        ranks = [adapter_rank(p) for _, p in parse_lora_paths(settings.lora_paths)]
        rank = max(ranks, default=MAX_LORA_RANK_LIMIT) or MAX_LORA_RANK_LIMIT
    if not 1 <= rank <= MAX_LORA_RANK_LIMIT:
        raise LoraError(f"--max-lora-rank must be in 1..{MAX_LORA_RANK_LIMIT}, got {rank}")
    return rank


def wrap_model(
    model: nn.Module,
    state: LoraSlotsState,
    num_slots: int,
    max_rank: int,
    dtype,
    targets: frozenset[str] = frozenset(TARGETS),
):
    """Replace each decoder layer's qkv_proj, o_proj, gate_up_proj and down_proj (those that hold one of
    targets: their slot buffers take GPU memory) by a LoraLinear over it; {(layer index, fused name):
    LoraLinear}. Raises LoraError for a model without them."""
    fused = {TARGETS[t][0] for t in targets}
    layers = getattr(getattr(model, "model", None), "layers", None)
    wrapped: dict[tuple[int, str], LoraLinear] = {}
    for i, layer in enumerate(layers or ()):
        for parent_name in ("self_attn", "mlp"):
            parent = getattr(layer, parent_name, None)
            for name in sorted(fused):
                base = getattr(parent, name, None) if parent is not None else None
                if isinstance(base, LinearBase):
                    lora = LoraLinear(base, name, state, num_slots, max_rank, dtype)
                    setattr(parent, name, lora)
                    wrapped[(i, name)] = lora
    if not wrapped:
        raise LoraError(f"{type(model).__name__} has no LoRA target layers (q/k/v/o/gate/up/down)")
    model.register_forward_pre_hook(lambda *_: state.new_forward())
    return wrapped


class LoraManager:
    def __init__(
        self,
        model: nn.Module,
        settings: LoraConfig,
        device: torch.device,
        dtype: torch.dtype,
        num_layers: int,
    ):
        self.num_slots = settings.max_loras_per_batch
        if self.num_slots < 1:
            raise LoraError("--max-loras-per-batch must be at least 1")
        self.max_loaded = max_loaded(settings)
        self.max_rank = resolve_max_rank(settings)
        self.targets = parse_target_modules(settings.lora_target_modules)
        self.device, self.dtype, self.num_layers = device, dtype, num_layers
        backend = settings.lora_backend
        # (kernels/ is imported only when a kernel runs: importing Triton fixes whether it interprets)
        interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if backend == "triton" and device.type == "cpu" and not interpreting:
            backend = "torch"  # Triton kernels need a GPU (or the interpreter, in tests)
        self.state = LoraSlotsState(self.num_slots, device, backend)
        self.layers = wrap_model(
            model, self.state, self.num_slots, self.max_rank, dtype, self.targets
        )
        log.info(
            "LoRA: %d GPU slots of rank %d over %s (%.1f MB), up to %d adapters in host memory, "
            "%s backend",
            self.num_slots,
            self.max_rank,
            ", ".join(sorted(self.targets)),
            sum(lyr.lora_a.nbytes + lyr.lora_b.nbytes for lyr in self.layers.values()) / 1e6,
            self.max_loaded,
            backend,
        )
        self.adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.slot_names: list[str | None] = [None] * self.num_slots
        self._lru: list[int] = list(range(self.num_slots))  # least recently used first
        self._graph_slots: torch.Tensor | None = None
        self.slot_loads = 0  # adapters copied into a GPU slot (a counter for tests and logs)
        for name, path in parse_lora_paths(settings.lora_paths):
            self.load(name, path)

    # ---- run-time management ----
    def load(self, name: str, path: str) -> LoraAdapter:
        if (problem := lora_name_problem(name)) is not None:
            raise LoraError(problem)
        if name in self.adapters:
            raise LoraError(f"adapter {name!r} is already loaded")
        if len(self.adapters) >= self.max_loaded:
            raise LoraError(
                f"{len(self.adapters)} adapters are loaded, the most this server holds "
                "(--max-loaded-loras): unload one first"
            )

        def slicer(layer, fused, shard, a, b):
            target = self.layers.get((layer, fused))
            if target is None:
                raise LoraError(f"adapter {name!r}: layer {layer} has no {fused} to adapt")
            return target.slice_for_rank(shard, a, b)

        adapter = read_adapter(
            name,
            path,
            max_rank=self.max_rank,
            targets=self.targets,
            num_layers=self.num_layers,
            slicer=slicer,
            dtype=self.dtype,
        )
        self.adapters[name] = adapter
        log.info(
            "loaded LoRA adapter %r from %s (rank %d, %.1f MB)",
            name,
            path,
            adapter.rank,
            adapter.nbytes() / 1e6,
        )
        return adapter

    def unload(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise LoraNotFound(f"adapter {name!r} is not loaded")
        for slot, held in enumerate(self.slot_names):
            if held == name:  # the slot is free again, as at start: the first one filled next
                self.slot_names[slot] = None
                self.state.scales[slot] = 0.0
                self._lru.remove(slot)
                self._lru.insert(0, slot)
        log.info("unloaded LoRA adapter %r", name)

    def names(self) -> list[str]:
        return list(self.adapters)

    def describe(self) -> list[dict]:
        """The loaded adapters as ExecutorLoraAdapter fields."""
        return [{"name": a.name, "path": a.path, "rank": a.rank} for a in self.adapters.values()]

    # ---- per step ----
    def check_step(self, step: StepInput, states: dict) -> None:
        """StepError unless every adapter the step names is loaded and they fit the slots (states:
        the runner's RequestStates, for the continuing requests' adapters)."""
        names = {r.lora_name for r in step.new_requests if r.lora_name}
        for r in step.new_requests:
            if r.lora_name and r.lora_name not in self.adapters:
                raise StepError(
                    f"request {r.request_id}: LoRA adapter {r.lora_name!r} is not loaded"
                )
        for c in step.continuing_requests:
            state = states.get(c.request_id)
            if state is not None and state.lora_name:
                names.add(state.lora_name)
        if len(names) > self.num_slots:
            raise StepError(
                f"the step names {len(names)} LoRA adapters; at most {self.num_slots} "
                "(--max-loras-per-batch) run together"
            )

    def prepare_batch(self, batch) -> None:
        """prepare() for a ForwardBatch (its seq_states, extends first)."""
        counts = [n for _, _, _, n in batch.seq_spans]
        self.prepare([s.lora_name for s in batch.seq_states], counts)

    def prepare(self, seq_names: list[str], seq_tokens: list[int]) -> None:
        """Put the step's adapters in slots and set the per-token slot ids (seq_names[i]: the adapter
        of the step's i-th sequence in token order, "" for none; seq_tokens[i]: its tokens)."""
        needed = {n for n in seq_names if n}
        if not needed:
            self.state.token_slots = None
            return
        slot_of = self._assign(needed)
        ids: list[int] = []
        for name, n in zip(seq_names, seq_tokens):
            ids += [slot_of[name] if name else BASE_SLOT] * n
        self.state.token_slots = to_device(ids, self.device, torch.int64)

    def _assign(self, needed: set[str]) -> dict[str, int]:
        slot_of = {n: s for s, n in enumerate(self.slot_names) if n in needed}
        for name in needed:
            if name in slot_of:
                continue
            if name not in self.adapters:  # unloaded while its request ran: a planning bug
                raise StepError(f"LoRA adapter {name!r} is not loaded")
            busy = set(slot_of.values())
            # an empty slot first, else the least recently used one the step does not need
            free = [s for s in self._lru if self.slot_names[s] is None]
            slot = free[0] if free else next(s for s in self._lru if s not in busy)
            self._fill(slot, name)
            slot_of[name] = slot
        for slot in slot_of.values():  # most recently used last
            self._lru.remove(slot)
            self._lru.append(slot)
        return slot_of

    def _fill(self, slot: int, name: str) -> None:
        adapter = self.adapters[name]
        for key, layer in self.layers.items():
            layer.fill_slot(slot, adapter.parts.get(key, ()))
        self.state.scales[slot] = adapter.scaling
        self.slot_names[slot] = name
        self.slot_loads += 1

    def resident(self) -> list[str]:
        """The adapters in GPU slots now."""
        return [n for n in self.slot_names if n is not None]

    # ---- CUDA graphs ----
    @contextlib.contextmanager
    def graph_capture(self, bs: int, max_bs: int):
        """Capture the LoRA kernels of a graph of bs tokens over the fixed slot-id buffer."""
        if self._graph_slots is None:
            self._graph_slots = torch.full(
                (max_bs,), BASE_SLOT, dtype=torch.int64, device=self.device
            )
        previous, self.state.token_slots = self.state.token_slots, self._graph_slots[:bs]
        try:
            yield
        finally:
            self.state.token_slots = previous

    def graph_fill(self, bs: int, bucket: int) -> None:
        """Before a replay of bucket for bs tokens: the step's slot ids, then -1 for the padding."""
        if self._graph_slots is None:
            return
        if self.state.token_slots is None:
            self._graph_slots[:bucket].fill_(BASE_SLOT)
            return
        self._graph_slots[:bs].copy_(self.state.token_slots)
        if bucket > bs:
            self._graph_slots[bs:bucket].fill_(BASE_SLOT)
