"""The scheduler core: admission, continuous batching, retraction, KV bookkeeping. No I/O.

Usage: add_request(); then repeatedly plan = schedule(), run it on the executor, events =
update(plan, outputs). Between steps every running request holds KV slots for all of its tokens
except the last sampled one (whose KV the next decode step writes).

Overlap: schedule() may be called again before update() of the plans in flight (updates come in
plan order). A request in k plans not yet updated holds a slot for every known token plus k - 1
more: the in-flight steps write the KV of tokens sampled by the steps before them.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable

from services.scheduler.kv_pool import KVPool
from services.scheduler.radix_cache import DisabledRadixCache, RadixCache
from services.scheduler.request import (
    ContinuingRequestPlan,
    FinishReason,
    NewRequestPlan,
    Request,
    RequestEvent,
    Status,
    StepOutput,
    StepPlan,
)

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
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown schedule policy {policy!r}; expected one of {POLICIES}")
        self.pool = KVPool(pool_size, debug=debug)
        self.cache = DisabledRadixCache() if disable_radix_cache else RadixCache()
        self.context_length = context_length
        self.max_running_requests = max(1, max_running_requests)
        self.max_prefill_tokens = max_prefill_tokens
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
        self._pending_finished: list[str] = []
        # Plans sent but not yet updated, oldest first, with the requests each one samples for.
        self._inflight: deque[tuple[StepPlan, list[Request]]] = deque()
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
        if prompt_len + max_new_tokens - 1 > self.pool.size - 1:
            return (f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                    f"the KV pool ({self.pool.size - 1} tokens)")
        return None

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise DuplicateRequestError(req.request_id)
        error = self.validate(len(req.prompt_ids), req.max_new_tokens)
        if error:
            raise ValueError(error)
        req.status = Status.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> RequestEvent | None:
        """Abort a queued or running request; its finish event, or None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            self._pending_finished.append(request_id)
            if req.inflight:
                self._releasing.append(req)  # steps in flight still write its KV
            else:
                self._release_kv(req)
        req.status = Status.DONE
        return self._event(req, FinishReason.ABORT)

    def abort_all(self) -> list[RequestEvent]:
        return [ev for rid in list(self.requests) if (ev := self.abort(rid)) is not None]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning --------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step: a prefill batch when requests can be admitted, else a decode batch.

        With steps in flight, None can also mean: wait for their results first.
        """
        planned = self._schedule_prefill() or self._schedule_decode()
        if planned is None:
            return None
        plan, reqs = planned
        for req in reqs:
            req.inflight += 1
        plan.finished_request_ids = self._pending_finished
        self._pending_finished = []
        self._inflight.append((plan, reqs))
        return plan

    def _next_plan(self) -> StepPlan:
        self._step_id += 1
        return StepPlan(step_id=self._step_id)

    def _schedule_prefill(self) -> tuple[StepPlan, list[Request]] | None:
        if not self.waiting or len(self.running) >= self.max_running_requests:
            return None
        plan = None
        admitted: list[Request] = []
        prefill_tokens = 0
        reserved = sum(self._future_tokens(r) for r in self.running)
        for req in self._admission_order():
            if len(self.running) + len(admitted) >= self.max_running_requests:
                break
            fill = req.seq
            # At least one token must run to sample from, so never match the whole sequence.
            prefix_slots, node = self.cache.match_prefix(fill[:-1])
            extend = len(fill) - len(prefix_slots)
            if admitted and prefill_tokens + extend > self.max_prefill_tokens:
                break
            self.cache.inc_lock_ref(node)
            reclaimable = self.pool.available() + self.cache.evictable_size()
            future = self._future_tokens(req)
            alone = not self.running and not admitted
            fits = extend + future <= reclaimable - reserved or (alone and extend <= reclaimable)
            new_slots = self._alloc(extend) if fits else None
            if new_slots is None:
                self.cache.dec_lock_ref(node)
                break
            self._admit(req, prefix_slots, node, new_slots)
            admitted.append(req)
            prefill_tokens += extend
            reserved += future
            plan = plan or self._next_plan()
            plan.new_requests.append(NewRequestPlan(
                request_id=req.request_id, input_ids=fill[len(prefix_slots):],
                prefix_slots=prefix_slots, new_slots=new_slots, sampling=req.sampling))
        if not admitted:
            return None
        self.waiting = [r for r in self.waiting if r.status is Status.WAITING]
        self.running += admitted
        return plan, admitted

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

    def _alloc(self, n: int) -> list[int] | None:
        short = n - self.pool.available()
        if short > 0:
            self.cache.evict(short, self.pool.free)
        return self.pool.alloc(n)

    def _schedule_decode(self) -> tuple[StepPlan, list[Request]] | None:
        batch = [r for r in self.running if not self._finishes_in_flight(r)]
        if not batch:
            return None
        if self._inflight:
            # Retraction is not overlapped: when the batch does not fit, drain the steps in flight
            # (their finished requests may free enough) and retract in a serial schedule().
            if self.pool.available() + self.cache.evictable_size() < len(batch):
                return None
        else:
            self._retract_until_decode_fits()
            batch = list(self.running)
        slots = self._alloc(len(batch))
        if slots is None:
            raise RuntimeError("KV pool cannot hold one more token for a lone request")
        plan = self._next_plan()
        for req, slot in zip(batch, slots):
            req.slots.append(slot)
            plan.continuing_requests.append(ContinuingRequestPlan(req.request_id, new_slots=[slot]))
        self.new_token_ratio = max(self.min_new_token_ratio,
                                   self.new_token_ratio - self.new_token_ratio_decay)
        return plan, batch

    def _finishes_in_flight(self, req: Request) -> bool:
        """Whether the steps in flight already bring req to max_new_tokens or the context length."""
        return bool(req.inflight) and (len(req.output_ids) + req.inflight >= req.max_new_tokens
                                       or req.seq_len + req.inflight >= self.context_length)

    def _retract_until_decode_fits(self) -> None:
        while (len(self.running) > 1
               and self.pool.available() + self.cache.evictable_size() < len(self.running)):
            self._retract(max(self.running, key=lambda r: r.admit_seq))

    def _retract(self, req: Request) -> None:
        """Send a running request back to the queue; its computed KV stays in the cache."""
        self.running.remove(req)
        self._release_kv(req)
        req.status = Status.WAITING
        # Retracted requests go first; retracting newest-first keeps them in admission order.
        self.waiting.insert(0, req)
        self._pending_finished.append(req.request_id)
        self.num_retractions += 1
        self.new_token_ratio = min(1.0, self.new_token_ratio + RETRACT_RATIO_BUMP)

    def _release_kv(self, req: Request, cache_len: int | None = None) -> None:
        """Hand the KV of the first cache_len tokens (default: all known tokens with a slot) to the
        cache, free the rest of the request's slots, and unlock its cached prefix."""
        if req.last_node is None:
            return
        if cache_len is None:
            cache_len = min(len(req.slots), req.seq_len)
        already_cached = self.cache.insert(req.seq[:cache_len], req.slots[:cache_len])
        self.pool.free(req.slots[req.prefix_len:already_cached] + req.slots[cache_len:])
        self.cache.dec_lock_ref(req.last_node)
        req.slots = []
        req.prefix_len = 0
        req.last_node = None

    # ---- results ---------------------------------------------------------------------------

    def update(self, plan: StepPlan, outputs: Iterable[StepOutput]) -> list[RequestEvent]:
        """Apply the executor's sampled tokens; return one event per live request of the plan."""
        if not self._inflight or plan is not self._inflight[0][0]:
            raise RuntimeError(f"update() for step {plan.step_id}, which is not the oldest step in flight")
        _, reqs = self._inflight.popleft()
        by_id = {o.request_id: o for o in outputs}
        events = []
        finished: set[int] = set()
        for req in reqs:
            req.inflight -= 1
            if req.status is not Status.RUNNING:
                continue  # aborted, or finished by an earlier step: its token is not emitted
            rid = req.request_id
            out = by_id.get(rid)
            if out is None:
                raise RuntimeError(f"executor returned no token for request {rid} in step {plan.step_id}")
            req.output_ids.append(out.token_id)
            if out.logprob is not None:
                req.logprobs.append(out.logprob)
            reason, matched = self._finish_reason(req, out.token_id)
            event = self._event(req, reason, matched)
            event.token_ids = [out.token_id]
            event.logprobs = [out.logprob] if out.logprob is not None else []
            events.append(event)
            if reason is not None:
                # Cache what a serial run caches: all but the last token. A step in flight may still
                # write that token's KV slot; it runs before any step that can reuse the slot.
                self._release_kv(req, cache_len=req.seq_len - 1)
                req.status = Status.DONE
                del self.requests[rid]
                self._pending_finished.append(rid)
                finished.add(id(req))
        if finished:
            self.running = [r for r in self.running if id(r) not in finished]
        self._release_settled_aborts()
        return events

    def _finish_reason(self, req: Request, token: int) -> tuple[FinishReason | None, int]:
        if token in self.eos_token_ids and not req.ignore_eos:
            return FinishReason.STOP, token
        if token in req.stop_token_ids:
            return FinishReason.STOP, token
        if len(req.output_ids) >= req.max_new_tokens or req.seq_len >= self.context_length:
            return FinishReason.LENGTH, 0
        return None, 0

    def _release_settled_aborts(self) -> None:
        settled = [r for r in self._releasing if not r.inflight]
        for req in settled:
            self._release_kv(req)
        if settled:
            self._releasing = [r for r in self._releasing if r.inflight]

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

    def reset(self) -> list[str]:
        """Drop every request and all KV (after an executor failure); return the dropped ids."""
        dropped = list(self.requests)
        known_to_executor = ([r.request_id for r in self.running] + self._pending_finished
                             + [rid for plan, _ in self._inflight for rid in plan.request_ids()])
        self.pool.reset()
        self.cache.reset()
        self.requests = {}
        self.waiting = []
        self.running = []
        self._inflight.clear()
        self._releasing = []
        self.new_token_ratio = self.init_new_token_ratio
        # The executor may still hold their state; the next step drops it.
        self._pending_finished = list(dict.fromkeys(known_to_executor))
        return dropped

    def executor_was_reset(self) -> None:
        """The executor dropped all request state itself: nothing left to tell it."""
        self._pending_finished = []

    def check_leak(self, deep: bool = False) -> str | None:
        """An error message if some KV slot is unaccounted for (or, deep, held twice)."""
        holders = self.running + self._releasing
        own = sum(r.own_slots for r in holders)
        free, evictable = self.pool.available(), self.cache.evictable_size()
        protected = self.cache.protected_size()
        total = self.pool.size - 1
        if free + evictable + protected + own != total:
            return (f"KV slot leak: free {free} + cached {evictable} + locked {protected} + "
                    f"request-owned {own} != pool {total}")
        if not holders and protected:
            return f"KV lock leak: {protected} cached slots still locked with no running request"
        if deep:
            held = list(self.pool._free) + self.cache.all_slots()
            for r in holders:
                held += r.slots[r.prefix_len:]
            if sorted(held) != list(range(1, self.pool.size)):
                return "KV slot bookkeeping corrupt: a slot is held twice or not at all"
        return None

    def stats(self) -> SchedulerStats:
        own = sum(r.own_slots for r in self.running + self._releasing)
        return SchedulerStats(
            pool_tokens=self.pool.size - 1,
            free=self.pool.available(),
            cached=self.cache.evictable_size(),
            in_use=self.cache.protected_size() + own,
            running=len(self.running),
            waiting=len(self.waiting),
            total_prompt_tokens=self.total_prompt_tokens,
            total_cached_prompt_tokens=self.total_cached_prompt_tokens,
            num_retractions=self.num_retractions,
        )
