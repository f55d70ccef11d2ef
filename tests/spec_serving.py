"""The in-process serving harness of the speculative-decoding tests (tests/scheduler/test_speculative.py:
NGRAM, tests/executor/test_eagle_serving.py: EAGLE): the scheduler core plans the steps and a real
ModelRunner (CPU, float32) runs them, the KV pool checked after every step; requests are tuples
(id, prompt, max new tokens, SamplingParams, StoppingCriteria keywords)."""

from __future__ import annotations

import pytest

from radixserve.common.sampling import SamplingParams, StoppingCriteria
from radixserve.common.step import StepInput
from radixserve.executor.runner import ModelRunner
from radixserve.scheduler.core import Scheduler
from radixserve.scheduler.request import Request
from tests.configs import scheduler_config


def make_scheduler(runner: ModelRunner, max_graph_tokens: int = 0, **config) -> Scheduler:
    return Scheduler(
        scheduler_config(max_running_requests=8, **config),
        runner.kv_slots,
        runner.config.context_length,
        max_graph_tokens=max_graph_tokens,
        max_tree_draft_tokens=runner.slot_table.spare_rows,  # as the executor reports them
    )


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def add_requests(sched: Scheduler, requests) -> None:
    for rid, prompt, max_new, sampling, stop in requests:
        sched.add_request(
            Request(rid, list(prompt), StoppingCriteria(max_new, **stop), sampling=sampling)
        )


def run(runner, sched, requests, max_steps=2000):
    """Serve requests to the end; per request its tokens, logprobs and finish event. The pool is
    checked after every step."""
    add_requests(sched, requests)
    tokens, logprobs, finals = {}, {}, {}
    for _ in range(max_steps):
        plan = sched.schedule()
        if plan is None:
            break
        out = runner.step(plan)
        for ev in sched.update(plan, out.outputs, out.prompt_logprobs):
            tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
            logprobs.setdefault(ev.request_id, []).extend(lp.logprob for lp in ev.logprobs)
            if ev.finished:
                finals[ev.request_id] = ev
        assert sched.check_leak(deep=True) is None
    assert not sched.has_work()
    # The pool is whole: nothing held, every slot free or in the cache.
    assert sched.check_leak(deep=True) is None
    sched.flush_cache()
    assert sched.pool.available() == sched.pool.capacity
    return tokens, logprobs, finals


def assert_same_outputs(got, reference) -> None:
    """run()'s results equal reference's: tokens, logprobs (to 1e-4) and finish reasons."""
    tokens, logprobs, finals = got
    ref_tokens, ref_logprobs, ref_finals = reference
    assert tokens == ref_tokens
    for rid in ref_logprobs:
        assert logprobs[rid] == pytest.approx(ref_logprobs[rid], abs=1e-4)
    assert {r: f.finish_reason for r, f in finals.items()} == {
        r: f.finish_reason for r, f in ref_finals.items()
    }


def run_overlapped(runner, sched, arrivals, rng, depth=2):
    """Like run(), with up to depth plans in flight (as the runtime overlaps), requests arriving over
    time (arrivals: {step index: [requests]}), random aborts and cache flushes. Returns the tokens
    and the aborted ids."""
    tokens, aborted, in_flight = {}, set(), []
    step = 0
    while arrivals or sched.has_work() or in_flight:
        add_requests(sched, arrivals.pop(step, []))
        step += 1
        if sched.requests and rng.random() < 0.01:
            rid = rng.choice(sorted(sched.requests))
            sched.abort(rid)
            aborted.add(rid)
        if rng.random() < 0.05:
            sched.flush_cache()
        plan = sched.schedule() if len(in_flight) < depth else None
        if plan is not None:
            in_flight.append(plan)
            continue
        if not in_flight:
            continue
        plan = in_flight.pop(0)
        out = runner.step(plan)
        for ev in sched.update(plan, out.outputs, out.prompt_logprobs):
            assert ev.request_id not in aborted or not ev.token_ids
            tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
        assert sched.check_leak(deep=True) is None
    # Finished requests' ids still reach the executor with the next step: send an empty one.
    runner.step(StepInput(10**6, finished_request_ids=sched._pending_finished))
    assert not runner.states
    assert sched.check_leak(deep=True) is None and sched.stats().in_use == 0
    sched.flush_cache()
    assert sched.pool.available() == sched.pool.capacity
    return tokens, aborted


def assert_greedy_outputs_match(requests, tokens, aborted, reference) -> None:
    """run_overlapped()'s greedy requests got reference's tokens (an aborted one a prefix of them)."""
    for rid, _, _, sampling, _ in requests:
        if sampling.temperature > 0:
            continue
        got = tokens.get(rid, [])
        if rid in aborted:
            assert got == reference[rid][: len(got)]
        else:
            assert got == reference[rid], rid
