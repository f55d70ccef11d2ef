"""The scheduler core: requests in and out, the steps in flight, their results. No I/O. Its parts:
admission and chunked prefill (prefill.py), decoding and retraction (decode.py), KV (kv_accounting.py),
when a request stops (stopping.py).

Usage: add_request(); then repeatedly plan = schedule(), run it on the executor, events =
update(plan, outputs). Between steps every running request holds KV slots for all of its tokens
except the last sampled one (whose KV the next decode step writes).

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

from collections import deque
from dataclasses import dataclass
from typing import Iterable

from radixserve.common.config import SchedulerConfig
from radixserve.common.draft_tree import keep_path_first
from radixserve.common.multimodal import check_images
from radixserve.scheduler.decode import DecodeManager
from radixserve.scheduler.kv_accounting import KVAccounting
from radixserve.scheduler.kv_pool import KVPool, PagedKVPool
from radixserve.scheduler.prefill import NewTokenRatio, PrefillManager
from radixserve.scheduler.radix_cache import DisabledRadixCache, RadixCache
from radixserve.common.step import PromptLogprobs, SampledToken, StepInput
from radixserve.scheduler.request import FinishReason, Request, RequestEvent, SchedulerStats, Status
from radixserve.scheduler.speculation import SpecStats, speculation_params
from radixserve.scheduler.stopping import finish_reason, grammar_verdict, request_event
from radixserve.scheduler.stream_interval import StreamBuffer


class DuplicateRequestError(KeyError):
    pass


@dataclass
class _Step:
    """A planned step and the requests whose counters it holds until its update."""

    plan: StepInput
    sampled: list[Request]  # requests it samples a token for
    chunk_req: Request | None = None  # the request it runs a non-sampling prefill chunk of


def image_error(req: Request) -> str | None:
    """Why a request's images or M-RoPE positions do not fit its prompt, or None."""
    error = check_images(req.images, len(req.prompt_ids))
    if not error and req.mrope_positions and len(req.mrope_positions) != 3 * len(req.prompt_ids):
        error = "mrope_positions must hold 3 positions per prompt token"
    return error


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        pool_size: int,
        context_length: int,
        *,
        eos_token_ids: Iterable[int] = (),
        min_new_token_ratio: float = 0.1,
        new_token_ratio_decay: float = 0.001,
        debug: bool = True,
        max_graph_tokens: int = 0,
        max_tree_draft_tokens: int = 0,
    ):
        """pool_size, context_length: the KV slots and longest sequence, as the executor serving the model
        has them; config.max_running_requests must be set (the server derives it from the pool if unset).
        max_graph_tokens: the executor's (ExecutorModelInfo.max_graph_tokens): a decode step's drafts
        are kept within it, so verify steps replay its CUDA graphs; 0: no limit.
        max_tree_draft_tokens: the executor's (ExecutorModelInfo.max_tree_draft_tokens): a step's
        tree drafts stay within it (the other requests draft chains)."""
        policy, page_size, max_prefill_tokens = (
            config.schedule_policy,
            config.page_size,
            config.max_prefill_tokens,
        )
        chunked_prefill_size, enable_mixed_chunk = (
            config.chunked_prefill_size,
            config.enable_mixed_chunk,
        )
        disable_radix_cache, max_running_requests = (
            config.disable_radix_cache,
            config.max_running_requests,
        )
        # SGLang's --schedule-conservativeness: the assumed share of a request's remaining tokens to reserve.
        init_new_token_ratio = min(0.7 * config.schedule_conservativeness, 1.0)
        self.kv = KVAccounting(pool_size, page_size, disable_radix_cache, debug)
        self.page_size = page_size
        self.context_length = context_length
        self.max_running_requests = max(1, max_running_requests)
        self.max_prefill_tokens = max_prefill_tokens
        self.chunked_prefill_size = chunked_prefill_size
        self.chunking = chunked_prefill_size > 0
        self.enable_mixed_chunk = enable_mixed_chunk
        # Most tokens one prefill step runs (without chunking, a lone long prompt may exceed it).
        self.prefill_budget = (
            min(max_prefill_tokens, chunked_prefill_size) if self.chunking else max_prefill_tokens
        )
        self.policy = policy
        self.disable_radix_cache = disable_radix_cache
        self.eos_token_ids = frozenset(eos_token_ids)
        self.init_new_token_ratio = init_new_token_ratio
        self.new_token_ratio = NewTokenRatio(
            init_new_token_ratio, min_new_token_ratio, new_token_ratio_decay
        )
        self.prefill = PrefillManager(
            self.kv,
            self.new_token_ratio,
            policy,
            self.max_running_requests,
            self.prefill_budget,
            self.chunking,
        )
        self.prefill.max_loras = config.max_loras_per_batch if config.lora_enabled else 0
        self.decode = DecodeManager(
            self.kv,
            self.new_token_ratio,
            context_length,
            speculation_params(config),
            max_verify_rows=max_graph_tokens,
            max_tree_rows=max_tree_draft_tokens,
            disable_by_batch_size=config.speculative_disable_by_batch_size,
        )
        self.spec_stats = SpecStats()
        # --stream-interval: events of a request leave update() every N tokens (stream_interval.py).
        self.stream = StreamBuffer(config.stream_interval)

        self.requests: dict[str, Request] = {}
        self._pending_finished: list[str] = []
        # Steps sent but not yet updated, oldest first.
        self._inflight: deque[_Step] = deque()
        self._step_id = 0

    # The state the parts own, read where the runtime, the server and the tests read it.
    @property
    def pool(self) -> KVPool | PagedKVPool:
        return self.kv.pool

    @property
    def cache(self) -> RadixCache | DisabledRadixCache:
        return self.kv.cache

    @property
    def _releasing(self) -> list[Request]:
        return self.kv.releasing

    @property
    def waiting(self) -> list[Request]:
        return self.prefill.waiting

    @property
    def chunked(self) -> Request | None:
        return self.prefill.chunked

    @property
    def total_prompt_tokens(self) -> int:
        return self.prefill.total_prompt_tokens

    @property
    def total_cached_prompt_tokens(self) -> int:
        return self.prefill.total_cached_prompt_tokens

    @property
    def running(self) -> list[Request]:
        return self.decode.running

    @property
    def num_retractions(self) -> int:
        return self.decode.num_retractions

    # ---- requests in and out -------------------------------------------------------------

    def validate(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """Why a request of this shape can never be served, or None."""
        if prompt_len < 1:
            return "input_ids must hold at least one token"
        if max_new_tokens < 1:
            return f"max_new_tokens must be at least 1 (got {max_new_tokens})"
        if prompt_len + max_new_tokens > self.context_length:
            return (
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the context length ({self.context_length})"
            )
        # Alone in the pool, a request needs a slot per token but its last one.
        if prompt_len + max_new_tokens - 1 > self.pool.capacity:
            return (
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the KV pool ({self.pool.capacity} tokens)"
            )
        return None

    def add_request(self, req: Request) -> None:
        """Queue req; ValueError when it can never be served (validate, image_error)."""
        if req.request_id in self.requests:
            raise DuplicateRequestError(req.request_id)
        error = self.validate(len(req.prompt_ids), req.stopping.max_new_tokens) or image_error(req)
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
                    self.prefill.chunked = None
                else:
                    left_running = True
                self._pending_finished.append(rid)
                self.kv.release_when_settled(req)  # steps in flight may still write its KV
            req.status = Status.DONE
            req.grammar = None
            events.append(self.stream.flush(request_event(req, FinishReason.ABORT)))
        if left_queue:
            self.prefill.drop_left_queue()
        if left_running:
            self.decode.running = [r for r in self.running if r.status is Status.RUNNING]
        return events

    def abort_all(self) -> list[RequestEvent]:
        return self.abort_many(list(self.requests))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked)

    def needs_result_before_next_step(self) -> bool:
        """Whether a running request's next token mask depends on a step's result (it has a grammar):
        planning ahead of the steps in flight would leave it out, so the runtime should not overlap."""
        return any(r.grammar is not None for r in self.running)

    def _holders(self) -> list[Request]:
        """Every request that holds KV slots."""
        return self.running + ([self.chunked] if self.chunked is not None else []) + self._releasing

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

    def _schedule_prefill(self) -> _Step | None:
        if not self.prefill.wants_step(len(self.running)):
            return None
        decodes = self.decode.batch_to_mix(self.prefill_budget) if self.enable_mixed_chunk else []
        build = self.prefill.plan(self.running, decodes)
        if build is None:
            return None
        self.decode.running += build.joined
        plan = self._next_plan()
        plan.new_requests = build.new_requests
        plan.continuing_requests = build.continuing
        if decodes:
            self.decode.plan_decodes(plan, decodes, drafts=False)
        return _Step(plan, build.joined + decodes, build.chunk_req)

    def _schedule_decode(self) -> _Step | None:
        batch = self.decode.decodable()
        if not batch:
            return None
        if self._inflight:
            # Retraction is not overlapped: when the batch does not fit, drain the steps in flight
            # (their finished requests may free enough) and retract in a serial schedule().
            if not self.kv.decode_fits(batch):
                return None
        else:
            self._pending_finished += self.decode.retract_until_decode_fits(self.prefill)
            batch = list(self.running)
        plan = self._next_plan()
        self.decode.plan_decodes(plan, batch)
        self.new_token_ratio.decay()
        return _Step(plan, batch)

    # ---- results ---------------------------------------------------------------------------

    def update(
        self,
        plan: StepInput,
        outputs: Iterable[SampledToken],
        prompt_logprobs: Iterable[PromptLogprobs] = (),
    ) -> list[RequestEvent]:
        """Apply the executor's sampled tokens (and prompt logprobs, sent with a request's first token);
        return at most one event per live request the plan sampled for: with --stream-interval N > 1,
        a request's tokens are held until N have gathered (its first token and its finish at once)."""
        if not self._inflight or plan is not self._inflight[0].plan:
            raise RuntimeError(
                f"update() for step {plan.step_id}, which is not the oldest step in flight"
            )
        step = self._inflight.popleft()
        if step.chunk_req is not None:
            step.chunk_req.chunks_inflight -= 1  # a chunk that does not sample has no output
        by_id = {o.request_id: o for o in outputs}
        for computed in prompt_logprobs:
            holder = self.requests.get(computed.request_id)
            if holder is not None:
                holder.prompt_logprobs += computed.logprobs
        events = []
        finished: set[int] = set()
        for req in step.sampled:
            req.inflight -= 1
            if req.status is not Status.RUNNING:
                continue  # aborted, or finished by an earlier step: its token is not emitted
            rid = req.request_id
            out = by_id.get(rid)
            if out is None:
                raise RuntimeError(
                    f"executor returned no token for request {rid} in step {plan.step_id}"
                )
            drafted, req.drafts_inflight = req.drafts_inflight, []
            parents, req.draft_parents_inflight = req.draft_parents_inflight, []
            req.proposed_draft_ids = list(out.proposed_draft_ids)
            req.proposed_draft_parents = list(out.proposed_draft_parents)
            if drafted:
                self.spec_stats.add(len(drafted), len(out.accepted_draft_ids))
            if parents:
                keep_path_first(req.slots, drafted, parents, out.accepted_draft_ids)
            event = self._append_tokens(req, out)
            event.prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, []
            events.append(event)
            reason = event.finish_reason
            if reason is None and drafted:
                self.kv.keep_slots(req, req.seq_len - 1)  # rejected drafts' slots
            if reason is not None:
                # Cache what a serial run caches: all but the last token. A step in flight may still
                # write that token's KV slot; it runs before any step that can reuse the slot.
                self.kv.release(req, cache_len=req.seq_len - 1)
                req.status = Status.DONE
                req.grammar = None
                del self.requests[rid]
                self._pending_finished.append(rid)
                finished.add(id(req))
        if finished:
            self.decode.running = [r for r in self.running if id(r) not in finished]
        self.kv.release_settled()
        return self.stream.release(events)

    def _append_tokens(self, req: Request, out: SampledToken) -> RequestEvent:
        """Append a step's tokens for req (its accepted drafts, then the executor's own token),
        checking its stop conditions after each: tokens after a stop are dropped."""
        tokens = [*out.accepted_draft_ids, out.token_id]
        drafts_logprobs = out.accepted_draft_logprobs or [None] * len(out.accepted_draft_ids)
        logprobs = [*drafts_logprobs, out.token_logprob()]
        emitted, emitted_logprobs = [], []
        reason, matched = None, 0
        for token, logprob in zip(tokens, logprobs):
            req.output_ids.append(token)
            emitted.append(token)
            if logprob is not None:
                req.logprobs.append(logprob)
                emitted_logprobs.append(logprob)
            reason, matched = finish_reason(req, token, self.eos_token_ids, self.context_length)
            if req.grammar is not None:
                reason, matched = grammar_verdict(req, token, reason, matched)
            if reason is not None:
                break
        event = request_event(req, reason, matched)
        event.token_ids = emitted
        event.logprobs = emitted_logprobs
        return event

    # ---- maintenance -----------------------------------------------------------------------

    def flush_cache(self) -> int:
        """Free every unlocked cache entry; return the number of slots freed."""
        return self.kv.flush_cache()

    def reset(self, keep_waiting: bool = False) -> list[str]:
        """Drop all KV and every admitted request (after an executor failure: their KV is gone);
        return the dropped ids. With keep_waiting the queued requests stay queued (they hold no KV;
        one retracted earlier re-runs its prompt and the tokens it already streamed); else they go too."""
        kept = self.waiting if keep_waiting else []
        kept_ids = {req.request_id for req in kept}
        dropped = [rid for rid in self.requests if rid not in kept_ids]
        admitted = self.running + ([self.chunked] if self.chunked is not None else [])
        known_to_executor = (
            [r.request_id for r in admitted]
            + self._pending_finished
            + [rid for step in self._inflight for rid in step.plan.request_ids()]
        )
        for req in admitted:
            req.status = Status.DONE
            req.grammar = None
        for req in kept:
            req.inflight = req.chunks_inflight = 0
            req.drafts_inflight = []
            req.draft_parents_inflight = []
            req.proposed_draft_ids = []
            req.proposed_draft_parents = []
        self.kv.reset()
        self.requests = {req.request_id: req for req in kept}
        self.prefill.reset(kept)
        self.decode.running = []
        self._inflight.clear()
        self.new_token_ratio.reset()
        self.stream.keep_only(kept_ids)
        # The executor may still hold their state; the next step drops it.
        self._pending_finished = list(dict.fromkeys(known_to_executor))
        return dropped

    def executor_was_reset(self) -> None:
        """The executor dropped all request state itself: nothing left to tell it."""
        self._pending_finished = []

    def check_leak(self, deep: bool = False) -> str | None:
        """An error message if some KV slot is unaccounted for (or, deep, held twice or a
        request's slots are not laid out by pages)."""
        return self.kv.check_leak(self._holders(), deep)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            pool_tokens=self.pool.capacity,
            free=self.pool.available(),
            cached=self.cache.evictable_size(),
            in_use=self.kv.in_use(self._holders()),
            running=len(self.running),
            waiting=len(self.waiting),
            total_prompt_tokens=self.total_prompt_tokens,
            total_cached_prompt_tokens=self.total_cached_prompt_tokens,
            num_retractions=self.num_retractions,
            spec_verify_steps=self.spec_stats.verify_steps,
            spec_draft_tokens=self.spec_stats.draft_tokens,
            spec_accepted_tokens=self.spec_stats.accepted_tokens,
        )
