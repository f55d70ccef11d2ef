"""The scheduler core driven by the pure-Python FakeModel (tests/fake_executor.py), which checks every plan's
slots and KV: Harness runs each plan at once, OverlapHarness keeps plans in flight as the runtime does; and
random traffic with its check."""

from __future__ import annotations

import random
from collections import defaultdict, deque

from hypothesis import strategies as st

from radixserve.common.sampling import StoppingCriteria
from radixserve.scheduler.core import Scheduler
from radixserve.common.step import SampledToken
from radixserve.scheduler.request import Request
from tests.fake_executor import FakeModel, reference_tokens as fake_reference_tokens
from tests.configs import scheduler_config

VOCAB = 1000


def reference_tokens(prompt: list[int], n: int) -> list[int]:
    return fake_reference_tokens(prompt, n, VOCAB)


class Harness:
    def __init__(
        self,
        pool_size=512,
        context_length=1024,
        max_running_requests=16,
        max_prefill_tokens=4096,
        eos_token_ids=(),
        min_new_token_ratio=0.1,
        **config,
    ):
        config = scheduler_config(
            max_running_requests=max_running_requests,
            max_prefill_tokens=max_prefill_tokens,
            **config,
        )
        self.sched = Scheduler(
            config,
            pool_size,
            context_length,
            eos_token_ids=eos_token_ids,
            min_new_token_ratio=min_new_token_ratio,
        )
        self.model = FakeModel(pool_size, VOCAB, page_size=config.page_size)
        self.plans = []
        self.outputs: dict[str, list[int]] = defaultdict(list)
        self.finals = {}
        self.prompt_logprobs: dict[str, list] = defaultdict(list)

    def add(self, rid, prompt, max_new=8, sampling=None, **stopping):
        extra = {} if sampling is None else {"sampling": sampling}
        self.sched.add_request(
            Request(rid, list(prompt), StoppingCriteria(max_new, **stopping), **extra)
        )

    def step(self):
        plan = self.sched.schedule()
        if plan is None:
            return None
        self.plans.append(plan)
        assert len(self.sched.running) <= self.sched.max_running_requests
        outputs = [SampledToken(rid, tok) for rid, tok in self.model.step(plan)]
        events = self.sched.update(plan, outputs, self.model.prompt_logprobs)
        for ev in events:
            self.outputs[ev.request_id] += ev.token_ids
            self.prompt_logprobs[ev.request_id] += ev.prompt_logprobs
            if ev.finished:
                self.finals[ev.request_id] = ev
        assert self.sched.check_leak(deep=True) is None
        return plan, events

    def run(self, max_steps=10_000):
        for _ in range(max_steps):
            if self.step() is None:
                break
        assert not self.sched.has_work()
        assert self.sched.check_leak(deep=True) is None

    def new_plan_of(self, rid):
        return next(n for p in self.plans for n in p.new_requests if n.request_id == rid)


def prompts(n, length=8, shared=0):
    return [[7] * shared + [100 + i] * (length - shared) for i in range(n)]


class OverlapHarness(Harness):
    """Keeps up to `depth` plans in flight; updates the oldest only when it cannot plan another."""

    def __init__(self, depth=2, **kwargs):
        super().__init__(**kwargs)
        self.depth = depth
        self.in_flight: deque = deque()
        self.overlapped = 0  # plans made while another was in flight

    def step(self):
        plan = self.sched.schedule() if len(self.in_flight) < self.depth else None
        if plan is not None:
            self.overlapped += bool(self.in_flight)
            self.plans.append(plan)
            self.in_flight.append(plan)
            return plan, []
        if not self.in_flight:
            return None
        plan = self.in_flight.popleft()
        outputs = [SampledToken(rid, tok) for rid, tok in self.model.step(plan)]
        events = self.sched.update(plan, outputs, self.model.prompt_logprobs)
        for ev in events:
            assert ev.request_id not in self.finals, (
                f"{ev.request_id} got a token after it finished"
            )
            self.outputs[ev.request_id] += ev.token_ids
            self.prompt_logprobs[ev.request_id] += ev.prompt_logprobs
            if ev.finished:
                self.finals[ev.request_id] = ev
        assert self.sched.check_leak(deep=True) is None
        return plan, events


def final_fields(harness):
    return {
        rid: (
            ev.finish_reason,
            ev.matched_stop_token_id,
            ev.prompt_tokens,
            ev.completion_tokens,
            ev.cached_tokens,
        )
        for rid, ev in harness.finals.items()
    }


def drive_random_traffic(h, rng: random.Random, steps: int, eos: set[int] | None = None):
    """Random arrivals, aborts and cache flushes, then run to the end. Returns the reference tokens
    of every request (cut at the first eos where the request does not ignore it) and the aborted ids."""
    capacity = h.sched.pool.capacity
    expected, aborted, next_id = {}, set(), 0
    for _ in range(steps):
        if rng.random() < 0.3:
            prompt = [rng.randrange(3) for _ in range(rng.randint(1, 10))]
            max_new = rng.randint(1, min(12, capacity + 1 - len(prompt)))
            rid = f"r{next_id}"
            next_id += 1
            ignore_eos = eos is None or rng.random() < 0.5
            h.add(rid, prompt, max_new=max_new, ignore_eos=ignore_eos)
            tokens = reference_tokens(prompt, max_new)
            if not ignore_eos:
                tokens = tokens[
                    : next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
                ]
            expected[rid] = tokens
        if h.sched.requests and rng.random() < 0.05:
            rid = rng.choice(sorted(h.sched.requests))
            h.sched.abort(rid)
            aborted.add(rid)
        if rng.random() < 0.05:
            h.sched.flush_cache()
        h.step()
    h.run()
    return expected, aborted


def check_random_traffic(
    h, expected: dict, aborted: set, deep: bool, check_usage: bool = False
) -> None:
    """Finished requests got exactly their reference tokens (aborted ones a prefix), nothing leaked,
    and a flush frees the whole pool."""
    for rid, tokens in expected.items():
        if rid in aborted:
            assert tokens[: len(h.outputs[rid])] == h.outputs[rid]
        else:
            assert h.outputs[rid] == tokens
            if check_usage:
                assert h.finals[rid].completion_tokens == len(tokens)
    assert h.sched.check_leak(deep=deep) is None
    h.sched.flush_cache()
    assert h.sched.pool.available() == h.sched.pool.capacity


# Chunk sizes (-1: off), mixing and page sizes the random traffic tests run under.
CHUNK_SIZES = st.sampled_from([-1, 1, 3, 8])
PAGE_SIZES = st.sampled_from([1, 4, 16])
