"""The scheduler core: admission, continuous batching, chunked prefill, retraction, KV bookkeeping.
No I/O.

Usage: add_request(); then repeatedly plan = schedule(), run it on the executor, events =
update(plan, outputs). Between steps every running request holds KV slots for all of its tokens
except the last sampled one (whose KV the next decode step writes).

Chunked prefill (chunked_prefill_size > 0, as SGLang's): a prefill step runs at most
min(max_prefill_tokens, chunked_prefill_size) tokens. A prompt longer than what is left of that
budget runs its first chunk without sampling and becomes the chunked request (at most one at a
time). It holds its slots and its locked prefix but stays out of `running`; every later prefill
step runs its next chunk first, until the last chunk samples and it joins `running`. Without
chunking, max_prefill_tokens caps a step's tokens except that one request is always admitted.

Mixed steps (enable_mixed_chunk): a prefill step also decodes one token for every running request,
so prefills do not stall decoding; those tokens count against the step's budget. When they would
take the whole budget, or memory cannot hold them, the step prefills only, as without mixing.

Pages (page_size > 1): the pool hands out whole pages and a request's slots run page by page (its
token i at offset i % page_size of its (i // page_size)-th page). The prefix cache matches and
stores whole pages only, so the partial last page of a finished or retracted request is freed,
not cached. The pool's and the cache's sizes are counted in slots.

Overlap: schedule() may be called again before update() of the plans in flight (updates come in
plan order). A request in k sampling plans not yet updated holds a slot for every known token plus
k - 1 more: the in-flight steps write the KV of tokens sampled by the steps before them. The next
chunk of a prefill may be planned while the previous one runs, since the executor runs steps in
order; a chunk that does not sample expects no output in update().

Structured output: a request with a grammar (Request.grammar) gets, in every plan entry that samples
for it, the token_bitmask of what its grammar allows next; update() feeds each sampled token to the
grammar and stops the request (FINISH_REASON_STOP) once the grammar has accepted its stop token, or
aborts it if the executor sampled a token the grammar forbids. A mask is only right once the
request's previous token is known, so a constrained request is never in two sampling plans in
flight at once; needs_result_before_next_step() tells the runtime to stop overlapping meanwhile
rather than have such requests skip every other step. A retracted request keeps its grammar: it has
accepted exactly output_ids, which the re-prefill runs as prompt.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from radixserve.scheduler.kv_pool import make_kv_pool
from radixserve.scheduler.radix_cache import make_radix_cache
from radixserve.common.step import ContinuingRequest, NewRequest, SampledToken, StepInput
from radixserve.scheduler.request import FinishReason, Request, RequestEvent, Status

POLICIES = ("fcfs", "lpm")
# Cap on one request's future tokens when estimating memory at admission (as SGLang does).
CLIP_MAX_NEW_TOKENS = 4096
# With a longer queue, lpm's per-request prefix matching costs more than it saves: use fcfs.
LPM_MAX_QUEUE = 128
# How much a retraction raises the estimate of the share of max_new_tokens requests will use.
RETRACT_RATIO_BUMP = 0.1


class DuplicateRequestError(KeyError):
    pass


@dataclass
class SchedulerStats:
    pool_tokens: int
    free: int
    cached: int  # evictable: held only by the prefix cache
    in_use: int  # held by running requests, their locked cache paths included
    running: int
    waiting: int
    total_prompt_tokens: int
    total_cached_prompt_tokens: int
    num_retractions: int


@dataclass
class _Step:
    """A planned step and the requests whose counters it holds until its update."""
    plan: StepInput
    sampled: list[Request]  # requests it samples a token for
    chunk_req: Request | None = None  # the request it runs a non-sampling prefill chunk of


@dataclass
class _PrefillBuild:
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


class Scheduler:
    def __init__(
        self,
        pool_size: int,
        context_length: int,
        max_running_requests: int,
        max_prefill_tokens: int = 16384,
        policy: str = "fcfs",
        disable_radix_cache: bool = False,
        eos_token_ids: Iterable[int] = (),
        init_new_token_ratio: float = 0.7,
        min_new_token_ratio: float = 0.1,
        new_token_ratio_decay: float = 0.001,
        debug: bool = True,
        chunked_prefill_size: int = -1,
        enable_mixed_chunk: bool = False,
        page_size: int = 1,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown schedule policy {policy!r}; expected one of {POLICIES}")
        self.pool = make_kv_pool(pool_size, page_size, debug=debug)
        self.cache = make_radix_cache(page_size, disable=disable_radix_cache)
        self.page_size = page_size
        self.context_length = context_length
        self.max_running_requests = max(1, max_running_requests)
        self.max_prefill_tokens = max_prefill_tokens
        self.chunked_prefill_size = chunked_prefill_size
        self.chunking = chunked_prefill_size > 0
        self.enable_mixed_chunk = enable_mixed_chunk
        # Most tokens one prefill step runs (without chunking, a lone long prompt may exceed it).
        self.prefill_budget = (min(max_prefill_tokens, chunked_prefill_size) if self.chunking
                               else max_prefill_tokens)
        self.policy = policy
        self.disable_radix_cache = disable_radix_cache
        self.eos_token_ids = frozenset(eos_token_ids)
        # Share of each running request's remaining max_new_tokens reserved at admission; decays
        # while decoding goes well, rises on retraction.
        self.init_new_token_ratio = init_new_token_ratio
        self.min_new_token_ratio = min_new_token_ratio
        self.new_token_ratio_decay = new_token_ratio_decay
        self.new_token_ratio = init_new_token_ratio

        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        # The request whose prefill is split over steps and not finished (holds KV, not running).
        self.chunked: Request | None = None
        self._pending_finished: list[str] = []
        # Steps sent but not yet updated, oldest first.
        self._inflight: deque[_Step] = deque()
        # Aborted requests whose KV waits for the update of their last in-flight step.
        self._releasing: list[Request] = []
        self._step_id = 0
        self._admit_counter = 0
        self.total_prompt_tokens = 0
        self.total_cached_prompt_tokens = 0
        self.num_retractions = 0

    # ---- requests in and out -------------------------------------------------------------

    def validate(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """Why a request of this shape can never be served, or None."""
        if prompt_len < 1:
            return "input_ids must hold at least one token"
        if max_new_tokens < 1:
            return f"max_new_tokens must be at least 1 (got {max_new_tokens})"
        if prompt_len + max_new_tokens > self.context_length:
            return (f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                    f"the context length ({self.context_length})")
        # Alone in the pool, a request needs a slot per token but its last one.
        if prompt_len + max_new_tokens - 1 > self.pool.capacity:
            return (f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                    f"the KV pool ({self.pool.capacity} tokens)")
        return None

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise DuplicateRequestError(req.request_id)
        error = self.validate(len(req.prompt_ids), req.stopping.max_new_tokens)
        if error:
            raise ValueError(error)
        req.status = Status.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> RequestEvent | None:
        """Abort a queued, prefilling or running request; its finish event, or None if unknown."""
        events = self.abort_many([request_id])
        return events[0] if events else None

    def abort_many(self, request_ids: Iterable[str]) -> list[RequestEvent]:
        """Abort queued, prefilling or running requests (unknown ids are skipped); their finish events.
        The queues are rebuilt once for the whole batch, so aborting k requests costs O(k + queues),
        not a list removal per request."""
        events = []
        left_queue = left_running = False
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req.status is Status.WAITING:
                left_queue = True
            else:
                if req is self.chunked:
                    self.chunked = None
                else:
                    left_running = True
                self._pending_finished.append(rid)
                if req.busy:
                    self._releasing.append(req)  # steps in flight still write its KV
                else:
                    self._release_kv(req)
            req.status = Status.DONE
            req.grammar = None
            events.append(self._event(req, FinishReason.ABORT))
        if left_queue:
            self.waiting = [r for r in self.waiting if r.status is Status.WAITING]
        if left_running:
            self.running = [r for r in self.running if r.status is Status.RUNNING]
        return events

    def abort_all(self) -> list[RequestEvent]:
        return self.abort_many(list(self.requests))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked)

    def needs_result_before_next_step(self) -> bool:
        """Whether a running request's next token mask depends on a step's result (it has a grammar):
        planning ahead of the steps in flight would leave it out, so the runtime should not overlap."""
        return any(r.grammar is not None for r in self.running)

    def _drop_admitted(self, req: Request) -> None:
        if req is self.chunked:
            self.chunked = None
        else:
            self.running.remove(req)

    def _holders(self) -> list[Request]:
        """Every request that holds KV slots."""
        chunked = [self.chunked] if self.chunked is not None else []
        return self.running + chunked + self._releasing

    # ---- planning --------------------------------------------------------------------------

    def schedule(self) -> StepInput | None:
        """The next step: a prefill batch when a prefill can run, else a decode batch.

        With steps in flight, None can also mean: wait for their results first.
        """
        step = self._schedule_prefill() or self._schedule_decode()
        if step is None:
            return None
        for req in step.sampled:
            req.inflight += 1
        if step.chunk_req is not None:
            step.chunk_req.chunks_inflight += 1
        step.plan.finished_request_ids = self._pending_finished
        self._pending_finished = []
        self._inflight.append(step)
        return step.plan

    def _next_plan(self) -> StepInput:
        self._step_id += 1
        return StepInput(step_id=self._step_id)

    def _reclaimable(self) -> int:
        return self.pool.available() + self.cache.evictable_size()

    def _schedule_prefill(self) -> _Step | None:
        if self.chunked is None and (not self.waiting
                                     or len(self.running) >= self.max_running_requests):
            return None
        decodes = self._decodes_to_mix()
        keep = self.pool.decode_need(decodes)
        build = _PrefillBuild(tokens_left=self.prefill_budget - len(decodes), keep=keep,
                              reserved=keep + sum(self._future_tokens(r) for r in self.running))
        if self.chunked is not None and not self._plan_next_chunk(build):
            return None  # memory cannot hold the chunk yet; nothing may overtake it
        if self.chunked is None:
            self._plan_admissions(build)
        if build.empty:
            return None
        self.running += build.joined
        plan = self._next_plan()
        plan.new_requests = build.new_requests
        plan.continuing_requests = build.continuing
        if decodes:
            self._plan_decodes(plan, decodes)
        return _Step(plan, build.joined + decodes, build.chunk_req)

    def _decodes_to_mix(self) -> list[Request]:
        """The running requests a prefill step also decodes: none unless mixing is on, and none when
        they would leave no budget for the prefill or do not fit in memory."""
        if not self.enable_mixed_chunk or not self.running:
            return []
        batch = [r for r in self.running if self._may_decode(r)]
        if len(batch) >= self.prefill_budget:
            return []
        if self.pool.decode_need(batch) > self._reclaimable():
            return []
        return batch

    def _plan_next_chunk(self, build: _PrefillBuild) -> bool:
        """Plan the chunked request's next chunk; False when memory cannot hold it now."""
        req = self.chunked
        fill = req.seq
        start = len(req.slots)
        n = min(len(fill) - start, build.tokens_left)
        new_slots = self._alloc(req.slots, n, keep=build.keep)
        if new_slots is None:
            return False
        req.slots += new_slots
        last = start + n == len(fill)
        build.continuing.append(ContinuingRequest(
            req.request_id, new_slots=new_slots, input_ids=fill[start:start + n], sample=last,
            token_bitmask=self._allowed_tokens(req, last)))
        build.tokens_left -= n
        if last:
            self.chunked = None
            build.joined.append(req)
        else:
            build.chunk_req = req
        return True

    def _plan_admissions(self, build: _PrefillBuild) -> None:
        for req in self._admission_order():
            if len(self.running) + len(build.joined) >= self.max_running_requests:
                break
            if not self._try_admit(req, build) or build.chunk_req is not None:
                break
        if build.new_requests:
            self.waiting = [r for r in self.waiting if r.status is Status.WAITING]

    def _try_admit(self, req: Request, build: _PrefillBuild) -> bool:
        """Admit req into the step (whole, or its first chunk); False if it does not fit."""
        fill = req.seq
        # At least one token must run to sample from, so never match the whole sequence.
        prefix_slots, node = self.cache.match_prefix(fill[:-1])
        prefix_len = len(prefix_slots)
        extend = len(fill) - prefix_len
        n = self._first_chunk_len(extend, build)
        if n <= 0:
            return False
        self.cache.inc_lock_ref(node)
        # Memory is checked for the whole prompt, so that later chunks find room.
        need = self.pool.slots_needed(prefix_len, extend)
        future = self._future_tokens(req)
        reclaimable = self._reclaimable()
        alone = not self.running and not build.joined
        fits = need + future <= reclaimable - build.reserved or (alone and need <= reclaimable)
        new_slots = self._alloc(prefix_slots, n) if fits else None
        if new_slots is None:
            self.cache.dec_lock_ref(node)
            return False
        self._admit(req, prefix_slots, node, new_slots)
        sample = n == extend
        build.new_requests.append(NewRequest(
            request_id=req.request_id, input_ids=fill[prefix_len:prefix_len + n],
            prefix_slots=prefix_slots, new_slots=new_slots, sampling=req.sampling, sample=sample,
            token_bitmask=self._allowed_tokens(req, sample),
            penalty_prompt_ids=fill if req.sampling.repetition_active else [], stopping=req.stopping,
            generated_tokens=len(req.output_ids), trace_context=req.trace_context))
        build.tokens_left -= n
        build.reserved += future
        if sample:
            build.joined.append(req)
        else:
            self.chunked = build.chunk_req = req
        return True

    def _first_chunk_len(self, extend: int, build: _PrefillBuild) -> int:
        """How many of a request's extend tokens the step runs (0: none, wait for the next step)."""
        if self.chunking:
            return min(extend, build.tokens_left)
        if build.new_requests and extend > build.tokens_left:
            return 0
        return extend  # the first request of a step always runs whole

    def _admission_order(self) -> list[Request]:
        if self.policy == "lpm" and len(self.waiting) <= LPM_MAX_QUEUE:
            matched = {id(r): len(self.cache.match_prefix(r.seq[:-1])[0]) for r in self.waiting}
            return sorted(self.waiting, key=lambda r: -matched[id(r)])
        return list(self.waiting)

    def _future_tokens(self, req: Request) -> int:
        return math.ceil(min(req.remaining_new_tokens, CLIP_MAX_NEW_TOKENS) * self.new_token_ratio)

    def _admit(self, req: Request, prefix_slots: list[int], node, new_slots: list[int]) -> None:
        req.status = Status.RUNNING
        req.prefix_len = len(prefix_slots)
        req.last_node = node
        req.slots = prefix_slots + new_slots
        self._admit_counter += 1
        req.admit_seq = self._admit_counter
        if not req.admitted_once:
            req.admitted_once = True
            req.cached_tokens = len(prefix_slots)
            self.total_prompt_tokens += len(req.prompt_ids)
            self.total_cached_prompt_tokens += len(prefix_slots)

    def _alloc(self, held: list[int], n: int, keep: int = 0) -> list[int] | None:
        """Slots for n more tokens of a request holding `held`, evicting cache entries as needed
        but leaving `keep` slots reclaimable; None if memory cannot."""
        need = self.pool.slots_needed(len(held), n)
        available = self.pool.available()
        if need + keep > available + self.cache.evictable_size():
            return None
        if need > available:
            self.cache.evict(need - available, self.pool.free)
        return self.pool.extend(held, n)

    def _alloc_decode(self, batch: list[Request]) -> list[int] | None:
        """A slot for the next token of each request in batch, evicting as needed."""
        short = self.pool.decode_need(batch) - self.pool.available()
        if short > 0:
            self.cache.evict(short, self.pool.free)
        return self.pool.alloc_decode(batch)

    def _plan_decodes(self, plan: StepInput, batch: list[Request]) -> None:
        slots = self._alloc_decode(batch)
        if slots is None:
            raise RuntimeError("KV pool cannot hold one more token for a lone request")
        for req, slot in zip(batch, slots):
            req.slots.append(slot)
            plan.continuing_requests.append(ContinuingRequest(
                req.request_id, new_slots=[slot], token_bitmask=self._allowed_tokens(req)))

    @staticmethod
    def _allowed_tokens(req: Request, sample: bool = True) -> bytes:
        """A plan entry's token_bitmask: the grammar's next-token mask when it samples for a
        constrained request, else empty (any token)."""
        return req.grammar.next_token_bitmask() if sample and req.grammar is not None else b""

    def _schedule_decode(self) -> _Step | None:
        batch = [r for r in self.running if self._may_decode(r)]
        if not batch:
            return None
        if self._inflight:
            # Retraction is not overlapped: when the batch does not fit, drain the steps in flight
            # (their finished requests may free enough) and retract in a serial schedule().
            if self._reclaimable() < self.pool.decode_need(batch):
                return None
        else:
            self._retract_until_decode_fits()
            batch = list(self.running)
        plan = self._next_plan()
        self._plan_decodes(plan, batch)
        self.new_token_ratio = max(self.min_new_token_ratio,
                                   self.new_token_ratio - self.new_token_ratio_decay)
        return _Step(plan, batch)

    def _may_decode(self, req: Request) -> bool:
        """Whether a decode of req may be planned now: not when the steps in flight already finish
        it, nor when its grammar's mask waits for the token a step in flight samples."""
        return not self._finishes_in_flight(req) and not (req.grammar is not None and req.inflight)

    def _finishes_in_flight(self, req: Request) -> bool:
        """Whether the steps in flight already bring req to max_new_tokens or the context length."""
        return bool(req.inflight) and (len(req.output_ids) + req.inflight >= req.stopping.max_new_tokens
                                       or req.seq_len + req.inflight >= self.context_length)

    def _decode_fits(self) -> bool:
        return self.pool.decode_need(self.running) <= self._reclaimable()

    def _retract_until_decode_fits(self) -> None:
        # The chunked request goes first: it is the newest admission and has decoded nothing.
        # (Only a serial schedule() retracts, so none of its chunks is in flight.)
        if self.chunked is not None and not self._decode_fits():
            self._retract(self.chunked)
        while len(self.running) > 1 and not self._decode_fits():
            self._retract(max(self.running, key=lambda r: r.admit_seq))

    def _retract(self, req: Request) -> None:
        """Send an admitted request back to the queue; its computed KV stays in the cache."""
        self._drop_admitted(req)
        self._release_kv(req)
        req.status = Status.WAITING
        # Retracted requests go first; retracting newest-first keeps them in admission order.
        self.waiting.insert(0, req)
        self._pending_finished.append(req.request_id)
        self.num_retractions += 1
        self.new_token_ratio = min(1.0, self.new_token_ratio + RETRACT_RATIO_BUMP)

    def _release_kv(self, req: Request, cache_len: int | None = None) -> None:
        """Hand the KV of the first cache_len tokens (default: all known tokens with a slot), in
        whole pages, to the cache, free the rest of the request's slots, and unlock its prefix."""
        if req.last_node is None:
            return
        if cache_len is None:
            cache_len = min(len(req.slots), req.seq_len)
        cache_len = self.pool.round_down(cache_len)
        already_cached = self.cache.insert(req.seq[:cache_len], req.slots[:cache_len])
        self.pool.free(req.slots[req.prefix_len:already_cached] + req.slots[cache_len:])
        self.cache.dec_lock_ref(req.last_node)
        req.slots = []
        req.prefix_len = 0
        req.last_node = None

    # ---- results ---------------------------------------------------------------------------

    def update(self, plan: StepInput, outputs: Iterable[SampledToken]) -> list[RequestEvent]:
        """Apply the executor's sampled tokens; return one event per live request the plan sampled for."""
        if not self._inflight or plan is not self._inflight[0].plan:
            raise RuntimeError(f"update() for step {plan.step_id}, which is not the oldest step in flight")
        step = self._inflight.popleft()
        if step.chunk_req is not None:
            step.chunk_req.chunks_inflight -= 1  # a chunk that does not sample has no output
        by_id = {o.request_id: o for o in outputs}
        events = []
        finished: set[int] = set()
        for req in step.sampled:
            req.inflight -= 1
            if req.status is not Status.RUNNING:
                continue  # aborted, or finished by an earlier step: its token is not emitted
            rid = req.request_id
            out = by_id.get(rid)
            if out is None:
                raise RuntimeError(f"executor returned no token for request {rid} in step {plan.step_id}")
            req.output_ids.append(out.token_id)
            logprob = out.token_logprob()
            if logprob is not None:
                req.logprobs.append(logprob)
            reason, matched = self._finish_reason(req, out.token_id)
            if req.grammar is not None:
                reason, matched = self._grammar_verdict(req, out.token_id, reason, matched)
            event = self._event(req, reason, matched)
            event.token_ids = [out.token_id]
            event.logprobs = [logprob] if logprob is not None else []
            events.append(event)
            if reason is not None:
                # Cache what a serial run caches: all but the last token. A step in flight may still
                # write that token's KV slot; it runs before any step that can reuse the slot.
                self._release_kv(req, cache_len=req.seq_len - 1)
                req.status = Status.DONE
                req.grammar = None
                del self.requests[rid]
                self._pending_finished.append(rid)
                finished.add(id(req))
        if finished:
            self.running = [r for r in self.running if id(r) not in finished]
        self._release_settled_aborts()
        return events

    def _finish_reason(self, req: Request, token: int) -> tuple[FinishReason | None, int]:
        # As the executor's mask: min_new_tokens tokens come before a stop token (which is in output_ids).
        stop_allowed = len(req.output_ids) > req.stopping.min_new_tokens
        if stop_allowed and token in self.eos_token_ids and not req.stopping.ignore_eos:
            return FinishReason.STOP, token
        if stop_allowed and token in req.stopping.stop_token_ids:
            return FinishReason.STOP, token
        if len(req.output_ids) >= req.stopping.max_new_tokens or req.seq_len >= self.context_length:
            return FinishReason.LENGTH, 0
        return None, 0

    @staticmethod
    def _grammar_verdict(req: Request, token: int, reason: FinishReason | None,
                         matched: int) -> tuple[FinishReason | None, int]:
        """Feed a sampled token to req's grammar, unless a stop token already ended the request:
        the grammar's stop token (EOS, even with ignore_eos) ends it, a token the grammar forbids
        (the executor ignored the mask) aborts it."""
        if reason is FinishReason.STOP:
            return reason, matched
        if not req.grammar.accept(token):
            return FinishReason.ABORT, 0
        if req.grammar.terminated:
            return FinishReason.STOP, token
        return reason, matched

    def _release_settled_aborts(self) -> None:
        settled = [r for r in self._releasing if not r.busy]
        for req in settled:
            self._release_kv(req)
        if settled:
            self._releasing = [r for r in self._releasing if r.busy]

    @staticmethod
    def _event(req: Request, reason: FinishReason | None, matched: int = 0) -> RequestEvent:
        return RequestEvent(
            request_id=req.request_id, finish_reason=reason, matched_stop_token_id=matched,
            prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens)

    # ---- maintenance -----------------------------------------------------------------------

    def flush_cache(self) -> int:
        """Free every unlocked cache entry; return the number of slots freed."""
        return self.cache.evict(self.cache.evictable_size(), self.pool.free)

    def reset(self, keep_waiting: bool = False) -> list[str]:
        """Drop all KV and every admitted request (after an executor failure: their KV is gone);
        return the dropped ids. With keep_waiting the queued requests stay queued (they hold no KV;
        one retracted earlier re-runs its prompt and the tokens it already streamed); else they go too."""
        kept = self.waiting if keep_waiting else []
        kept_ids = {req.request_id for req in kept}
        dropped = [rid for rid in self.requests if rid not in kept_ids]
        admitted = self.running + ([self.chunked] if self.chunked is not None else [])
        known_to_executor = ([r.request_id for r in admitted] + self._pending_finished
                             + [rid for step in self._inflight for rid in step.plan.request_ids()])
        for req in admitted:
            req.status = Status.DONE
            req.grammar = None
        for req in kept:
            req.inflight = req.chunks_inflight = 0
        self.pool.reset()
        self.cache.reset()
        self.requests = {req.request_id: req for req in kept}
        self.waiting = list(kept)
        self.running = []
        self.chunked = None
        self._inflight.clear()
        self._releasing = []
        self.new_token_ratio = self.init_new_token_ratio
        # The executor may still hold their state; the next step drops it.
        self._pending_finished = list(dict.fromkeys(known_to_executor))
        return dropped

    def executor_was_reset(self) -> None:
        """The executor dropped all request state itself: nothing left to tell it."""
        self._pending_finished = []

    def _own_slots(self, req: Request) -> int:
        """Slots req holds that the cache does not (its partial last page counted whole)."""
        return self.pool.round_up(len(req.slots)) - req.prefix_len

    def check_leak(self, deep: bool = False) -> str | None:
        """An error message if some KV slot is unaccounted for (or, deep, held twice or a
        request's slots are not laid out by pages)."""
        holders = self._holders()
        own = sum(self._own_slots(r) for r in holders)
        free, evictable = self.pool.available(), self.cache.evictable_size()
        protected = self.cache.protected_size()
        total = self.pool.capacity
        if free + evictable + protected + own != total:
            return (f"KV slot leak: free {free} + cached {evictable} + locked {protected} + "
                    f"request-owned {own} != pool {total}")
        if not holders and protected:
            return f"KV lock leak: {protected} cached slots still locked with no running request"
        if deep:
            return self._check_slots_deep(holders)
        return None

    def _check_slots_deep(self, holders: list[Request]) -> str | None:
        ps = self.page_size
        held = self.pool.free_slots() + self.cache.all_slots()
        for r in holders:
            if r.prefix_len % ps:
                return f"request {r.request_id}: cached prefix of {r.prefix_len} is not whole pages"
            try:
                held += self.pool.occupied(r.slots[r.prefix_len:])
            except ValueError as e:
                return f"request {r.request_id}: {e}"
        if sorted(held) != list(range(ps, self.pool.num_pages * ps)):
            return "KV slot bookkeeping corrupt: a slot is held twice or not at all"
        return None

    def stats(self) -> SchedulerStats:
        own = sum(self._own_slots(r) for r in self._holders())
        return SchedulerStats(
            pool_tokens=self.pool.capacity,
            free=self.pool.available(),
            cached=self.cache.evictable_size(),
            in_use=self.cache.protected_size() + own,
            running=len(self.running),
            waiting=len(self.waiting),
            total_prompt_tokens=self.total_prompt_tokens,
            total_cached_prompt_tokens=self.total_cached_prompt_tokens,
            num_retractions=self.num_retractions,
        )
