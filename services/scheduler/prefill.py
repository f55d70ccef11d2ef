"""Admission and chunked prefill: which queued requests a prefill step runs, and how much of each.

Chunked prefill (chunked_prefill_size > 0, as SGLang's): a prefill step runs at most
min(max_prefill_tokens, chunked_prefill_size) tokens. A prompt longer than what is left of that
budget runs its first chunk without sampling and becomes the chunked request (at most one at a
time). It holds its slots and its locked prefix but stays out of `running`; every later prefill
step runs its next chunk first, until the last chunk samples and it joins `running`. Without
chunking, max_prefill_tokens caps a step's tokens except that one request is always admitted.

A request is admitted only when memory holds its whole prompt plus an estimate of the tokens it and
every running request will still generate (NewTokenRatio); a request alone is admitted whenever its
prompt fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from radixserve.scheduler.kv_accounting import KVAccounting
from radixserve.scheduler.lora_admission import active_adapters, adapter_fits, resident_first
from radixserve.scheduler.prompt_logprobs import plan_range, prefix_limit
from radixserve.scheduler.radix_cache import TreeNode
from radixserve.common.step import ContinuingRequest, NewRequest
from radixserve.scheduler.request import Request, Status

POLICIES = ("fcfs", "lpm")
# Cap on one request's future tokens when estimating memory at admission (as SGLang does).
CLIP_MAX_NEW_TOKENS = 4096
# With a longer queue, lpm's per-request prefix matching costs more than it saves: use fcfs.
LPM_MAX_QUEUE = 128
# How much a retraction raises the estimate of the share of max_new_tokens requests will use.
RETRACT_RATIO_BUMP = 0.1


class NewTokenRatio:
    """The share of each running request's remaining max_new_tokens reserved at admission; decays
    while decoding goes well, rises on retraction."""

    def __init__(self, init: float, minimum: float, decay_step: float):
        self.init = init
        self.minimum = minimum
        self.decay_step = decay_step
        self.value = init

    def future_tokens(self, req: Request) -> int:
        return math.ceil(min(req.remaining_new_tokens, CLIP_MAX_NEW_TOKENS) * self.value)

    def decay(self) -> None:
        self.value = max(self.minimum, self.value - self.decay_step)

    def bump(self) -> None:
        self.value = min(1.0, self.value + RETRACT_RATIO_BUMP)

    def reset(self) -> None:
        self.value = self.init


def allowed_tokens(req: Request, sample: bool = True) -> bytes:
    """A plan entry's token_bitmask: the grammar's next-token mask when it samples for a
    constrained request, else empty (any token)."""
    return req.grammar.next_token_bitmask() if sample and req.grammar is not None else b""


@dataclass
class PrefillBuild:
    """A prefill step while it is being planned."""

    tokens_left: int  # of the step's token budget
    keep: int  # slots the step's mixed decodes will take: every allocation leaves them
    reserved: int  # slots promised to running requests' future tokens (keep included)
    new_requests: list[NewRequest] = field(default_factory=list)
    continuing: list[ContinuingRequest] = field(default_factory=list)
    joined: list[Request] = field(default_factory=list)  # finish their prefill: join `running`
    chunk_req: Request | None = None

    @property
    def empty(self) -> bool:
        return not self.new_requests and not self.continuing


class PrefillManager:
    """The queue of requests waiting for admission and the chunked request, and the planning of
    prefill steps over them."""

    def __init__(
        self,
        kv: KVAccounting,
        ratio: NewTokenRatio,
        policy: str,
        max_running_requests: int,
        budget: int,
        chunking: bool,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown schedule policy {policy!r}; expected one of {POLICIES}")
        self.kv = kv
        self.ratio = ratio
        self.policy = policy
        self.max_running_requests = max_running_requests
        self.budget = budget  # most tokens one prefill step runs (see `chunking`)
        self.chunking = chunking
        self.waiting: list[Request] = []
        # The request whose prefill is split over steps and not finished (holds KV, not running).
        self.chunked: Request | None = None
        self.admit_counter = 0
        # Most distinct LoRA adapters among the running requests (lora_admission.py); 0: LoRA off.
        self.max_loras = 0
        self.total_prompt_tokens = 0
        self.total_cached_prompt_tokens = 0

    def wants_step(self, num_running: int) -> bool:
        """Whether a prefill step may run: a chunk is pending, or requests wait and may join `running`."""
        return self.chunked is not None or (
            bool(self.waiting) and num_running < self.max_running_requests
        )

    def plan(self, running: list[Request], decodes: list[Request]) -> PrefillBuild | None:
        """The next chunk of the chunked request and, after its last chunk, admissions from the
        queue; the step also decodes `decodes`. None when nothing can run."""
        keep = self.kv.pool.decode_need(decodes)
        build = PrefillBuild(
            tokens_left=self.budget - len(decodes),
            keep=keep,
            reserved=keep + sum(self.ratio.future_tokens(r) for r in running),
        )
        if self.chunked is not None and not self._plan_next_chunk(build):
            return None  # memory cannot hold the chunk yet; nothing may overtake it
        if self.chunked is None:
            self._plan_admissions(running, build)
        return None if build.empty else build

    def drop_left_queue(self) -> None:
        """Take requests that are no longer waiting (admitted or aborted) out of the queue."""
        self.waiting = [r for r in self.waiting if r.status is Status.WAITING]

    def requeue(self, req: Request) -> None:
        """Put a retracted request back in the queue (it no longer holds KV)."""
        if req is self.chunked:
            self.chunked = None
        req.status = Status.WAITING
        # Retracted requests go first; retracting newest-first keeps them in admission order.
        self.waiting.insert(0, req)

    def reset(self, kept: list[Request]) -> None:
        """Queue only `kept` and forget the chunked request (its KV is gone); the counters stay."""
        self.waiting = list(kept)
        self.chunked = None

    def _plan_next_chunk(self, build: PrefillBuild) -> bool:
        """Plan the chunked request's next chunk; False when memory cannot hold it now."""
        req = self.chunked
        fill = req.seq
        start = len(req.slots)
        n = min(len(fill) - start, build.tokens_left)
        new_slots = self.kv.alloc(req.slots, n, keep=build.keep)
        if new_slots is None:
            return False
        req.slots += new_slots
        last = start + n == len(fill)
        build.continuing.append(
            ContinuingRequest(
                req.request_id,
                new_slots=new_slots,
                input_ids=fill[start : start + n],
                sample=last,
                token_bitmask=allowed_tokens(req, last),
                prompt_logprobs=plan_range(req, start, n),
            )
        )
        build.tokens_left -= n
        if last:
            self.chunked = None
            build.joined.append(req)
        else:
            build.chunk_req = req
        return True

    def _plan_admissions(self, running: list[Request], build: PrefillBuild) -> None:
        order = self._admission_order()
        active = active_adapters([*running, self.chunked]) if self.max_loras else set()
        if active:
            order = resident_first(order, active)
        for req in order:
            if len(running) + len(build.joined) >= self.max_running_requests:
                break
            if self.max_loras:
                if not adapter_fits(req, active, self.max_loras):
                    continue
                active |= active_adapters([req])
            if not self._try_admit(req, running, build) or build.chunk_req is not None:
                break
        if build.new_requests:
            self.drop_left_queue()

    def _try_admit(self, req: Request, running: list[Request], build: PrefillBuild) -> bool:
        """Admit req into the step (whole, or its first chunk); False if it does not fit."""
        cache, pool = self.kv.cache, self.kv.pool
        fill = req.seq
        # Never the whole sequence (a token must run to sample from), nor wanted prompt logprobs.
        prefix_slots, node = cache.match_prefix(
            req.cache_seq[: prefix_limit(req, len(fill))], req.lora_name
        )
        prefix_len = len(prefix_slots)
        extend = len(fill) - prefix_len
        n = self._first_chunk_len(extend, build)
        if n <= 0:
            return False
        cache.inc_lock_ref(node)
        # Memory is checked for the whole prompt, so that later chunks find room.
        need = pool.slots_needed(prefix_len, extend)
        future = self.ratio.future_tokens(req)
        reclaimable = self.kv.reclaimable()
        alone = not running and not build.joined
        fits = need + future <= reclaimable - build.reserved or (alone and need <= reclaimable)
        new_slots = self.kv.alloc(prefix_slots, n) if fits else None
        if new_slots is None:
            cache.dec_lock_ref(node)
            return False
        self._admit(req, prefix_slots, node, new_slots)
        sample = n == extend
        build.new_requests.append(
            NewRequest(
                request_id=req.request_id,
                input_ids=fill[prefix_len : prefix_len + n],
                prefix_slots=prefix_slots,
                new_slots=new_slots,
                sampling=req.sampling,
                sample=sample,
                token_bitmask=allowed_tokens(req, sample),
                penalty_prompt_ids=fill if req.sampling.repetition_active else [],
                stopping=req.stopping,
                generated_tokens=len(req.output_ids),
                trace_context=req.trace_context,
                prompt_logprobs=plan_range(req, prefix_len, n),
                images=req.images,
                mrope_positions=req.mrope_positions,
                mrope_position_delta=req.mrope_position_delta,
                lora_name=req.lora_name,
            )
        )
        build.tokens_left -= n
        build.reserved += future
        if sample:
            build.joined.append(req)
        else:
            self.chunked = build.chunk_req = req
        return True

    def _first_chunk_len(self, extend: int, build: PrefillBuild) -> int:
        """How many of a request's extend tokens the step runs (0: none, wait for the next step)."""
        if self.chunking:
            return min(extend, build.tokens_left)
        if build.new_requests and extend > build.tokens_left:
            return 0
        return extend  # the first request of a step always runs whole

    def _admission_order(self) -> list[Request]:
        if self.policy == "lpm" and len(self.waiting) <= LPM_MAX_QUEUE:
            matched = {
                id(r): len(self.kv.cache.match_prefix(r.cache_seq[:-1], r.lora_name)[0])
                for r in self.waiting
            }
            return sorted(self.waiting, key=lambda r: -matched[id(r)])
        return list(self.waiting)

    def _admit(
        self, req: Request, prefix_slots: list[int], node: TreeNode, new_slots: list[int]
    ) -> None:
        req.status = Status.RUNNING
        req.prefix_len = len(prefix_slots)
        req.last_node = node
        req.slots = prefix_slots + new_slots
        self.admit_counter += 1
        req.admit_seq = self.admit_counter
        if not req.admitted_once:
            req.admitted_once = True
            req.cached_tokens = len(prefix_slots)
            self.total_prompt_tokens += len(req.prompt_ids)
            self.total_cached_prompt_tokens += len(prefix_slots)
