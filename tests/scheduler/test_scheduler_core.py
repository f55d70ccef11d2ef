"""Scheduler core driven by the pure-Python FakeModel, which checks every plan's slots and KV."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.scheduler.core import DuplicateRequestError, Scheduler
from radixserve.common.sampling import StoppingCriteria
from radixserve.common.step import SampledToken
from radixserve.scheduler.request import FinishReason, Request
from tests.configs import scheduler_config
from tests.scheduler.harness import (
    CHUNK_SIZES,
    PAGE_SIZES,
    Harness,
    check_random_traffic,
    drive_random_traffic,
    prompts,
    reference_tokens,
)


def test_single_request_matches_reference():
    h = Harness()
    h.add("a", [1, 2, 3, 4], max_new=10)
    h.run()
    assert h.outputs["a"] == reference_tokens([1, 2, 3, 4], 10)
    final = h.finals["a"]
    assert final.finish_reason == FinishReason.LENGTH
    assert (final.prompt_tokens, final.completion_tokens, final.cached_tokens) == (4, 10, 0)
    first = h.plans[0].new_requests[0]
    assert (
        first.prefix_slots == [] and first.input_ids == [1, 2, 3, 4] and len(first.new_slots) == 4
    )
    assert all(len(p.continuing_requests[0].new_slots) == 1 for p in h.plans[1:])


def test_continuous_batching_requests_join_midway():
    h = Harness()
    h.add("a", [1, 2, 3], max_new=10)
    for _ in range(3):
        h.step()
    h.add("b", [4, 5, 6], max_new=5)
    plan, _ = h.step()
    assert [n.request_id for n in plan.new_requests] == ["b"] and not plan.continuing_requests
    plan, _ = h.step()
    assert sorted(c.request_id for c in plan.continuing_requests) == ["a", "b"]
    h.run()
    assert h.outputs["a"] == reference_tokens([1, 2, 3], 10)
    assert h.outputs["b"] == reference_tokens([4, 5, 6], 5)


def test_max_running_requests_respected():
    h = Harness(max_running_requests=2)
    for i, p in enumerate(prompts(5)):
        h.add(f"r{i}", p, max_new=4)
    h.run()
    assert max(len(p.new_requests) + len(p.continuing_requests) for p in h.plans) <= 2
    for i, p in enumerate(prompts(5)):
        assert h.outputs[f"r{i}"] == reference_tokens(p, 4)


def test_max_prefill_tokens_respected_but_one_request_always_admitted():
    h = Harness(max_prefill_tokens=25)
    for i, p in enumerate(prompts(3, length=10)):
        h.add(f"r{i}", p)
    h.add("big", [9] * 40)
    h.run()
    prefills = [p for p in h.plans if p.new_requests]
    assert [[n.request_id for n in p.new_requests] for p in prefills] == [
        ["r0", "r1"],
        ["r2"],
        ["big"],
    ]
    for p in prefills:
        assert len(p.new_requests) == 1 or sum(len(n.input_ids) for n in p.new_requests) <= 25


def test_prefix_reuse_shares_slots_and_reports_cached_tokens():
    h = Harness()
    shared = [3, 1, 4, 1, 5, 9, 2, 6]
    h.add("a", shared + [10, 11], max_new=3)
    h.run()
    h.add("b", shared + [20], max_new=3)
    h.run()
    a_new, b_new = h.new_plan_of("a"), h.new_plan_of("b")
    assert b_new.prefix_slots == a_new.new_slots[: len(shared)]
    assert b_new.input_ids == [20]
    assert h.finals["b"].cached_tokens == len(shared)
    assert h.outputs["b"] == reference_tokens(shared + [20], 3)
    assert h.sched.total_prompt_tokens == 19 and h.sched.total_cached_prompt_tokens == len(shared)


def test_identical_prompt_rerun_matches_all_but_last_token():
    h = Harness()
    h.add("a", [1, 2, 3, 4], max_new=2)
    h.run()
    h.add("b", [1, 2, 3, 4], max_new=2)
    h.run()
    assert h.new_plan_of("b").input_ids == [4]
    assert h.outputs["a"] == h.outputs["b"]


def test_finished_ids_go_to_the_next_plan():
    h = Harness()
    h.add("a", [1, 2], max_new=1)
    h.add("b", [3, 4], max_new=3)
    h.run()
    assert "a" in h.plans[1].finished_request_ids
    assert h.plans[0].finished_request_ids == []


def test_eviction_under_memory_pressure():
    h = Harness(pool_size=41)
    for i, p in enumerate(prompts(8, length=10)):
        h.add(f"r{i}", p, max_new=5)
        h.run()
        assert h.outputs[f"r{i}"] == reference_tokens(p, 5)
    stats = h.sched.stats()
    assert stats.cached + stats.free == 40
    assert stats.cached > 0


def unconstrained_outputs(reqs):
    h = Harness(pool_size=4096)
    for rid, prompt, max_new in reqs:
        h.add(rid, prompt, max_new=max_new, ignore_eos=True)
    h.run()
    return dict(h.outputs)


def test_retraction_when_decodes_do_not_fit():
    reqs = [(f"r{i}", p, 20) for i, p in enumerate(prompts(6, length=8, shared=3))]
    h = Harness(pool_size=48, schedule_conservativeness=0.0, min_new_token_ratio=0.0)
    for rid, prompt, max_new in reqs:
        h.add(rid, prompt, max_new=max_new, ignore_eos=True)
    h.run()
    assert h.sched.num_retractions > 0
    assert dict(h.outputs) == unconstrained_outputs(reqs)
    assert all(len(h.outputs[rid]) == 20 for rid, _, _ in reqs)
    assert all(h.finals[rid].finish_reason == FinishReason.LENGTH for rid, _, _ in reqs)
    # A retracted request is dropped from the executor, then comes back as new with its tokens so far.
    admissions = defaultdict(list)
    for index, plan in enumerate(h.plans):
        for n in plan.new_requests:
            admissions[n.request_id].append((index, n))
    rid, ((first, _), (again, readmitted), *_) = next(
        (r, a) for r, a in admissions.items() if len(a) > 1
    )
    assert any(rid in p.finished_request_ids for p in h.plans[first + 1 : again + 1])
    assert len(readmitted.prefix_slots) + len(readmitted.input_ids) > 8
    assert readmitted.prefix_slots  # its computed KV was kept in the cache


def test_retracted_request_goes_to_the_front_of_the_queue():
    h = Harness(
        pool_size=20, max_running_requests=2, schedule_conservativeness=0.0, min_new_token_ratio=0.0
    )
    h.add("a", [1] * 6, max_new=12, ignore_eos=True)
    h.add("b", [2] * 6, max_new=12, ignore_eos=True)
    h.add("c", [3] * 6, max_new=12, ignore_eos=True)
    while h.sched.num_retractions == 0:
        h.step()
    assert [r.request_id for r in h.sched.running] == ["a"]
    assert [r.request_id for r in h.sched.waiting] == ["b", "c"]
    assert h.plans[-1].finished_request_ids == ["b"]
    h.run()
    assert all(len(h.outputs[rid]) == 12 for rid in "abc")


def test_abort_waiting_request():
    h = Harness(max_running_requests=1)
    h.add("a", [1, 2], max_new=5)
    h.add("b", [3, 4], max_new=5)
    h.step()
    ev = h.sched.abort("b")
    assert ev.finish_reason == FinishReason.ABORT and ev.completion_tokens == 0
    assert h.sched.abort("b") is None
    h.run()
    assert "b" not in h.outputs


def test_abort_running_request_frees_kv():
    h = Harness(pool_size=64)
    h.add("a", [1, 2, 3], max_new=50)
    h.step()
    h.step()
    ev = h.sched.abort("a")
    assert ev.finish_reason == FinishReason.ABORT and ev.completion_tokens == 2
    assert h.sched.check_leak(deep=True) is None
    stats = h.sched.stats()
    assert stats.running == 0 and stats.in_use == 0 and stats.free + stats.cached == 63
    h.add("b", [9], max_new=2)
    plan, _ = h.step()
    assert plan.finished_request_ids == ["a"]
    h.run()


def test_abort_during_step_in_flight():
    h = Harness()
    h.add("a", [1, 2, 3], max_new=50)
    h.add("b", [4, 5, 6], max_new=3)
    h.step()
    plan = h.sched.schedule()
    outputs = [SampledToken(rid, tok) for rid, tok in h.model.step(plan)]
    assert h.sched.abort("a").finish_reason == FinishReason.ABORT
    h.sched.add_request(Request("a", [7, 7], StoppingCriteria(2)))  # the id is free again at once
    events = h.sched.update(plan, outputs)
    assert [e.request_id for e in events] == ["b"]
    assert h.sched.check_leak(deep=True) is None
    h.outputs["a"] = []
    h.run()
    assert h.outputs["a"] == reference_tokens([7, 7], 2)


def test_idle_has_no_leak_and_flush_frees_everything():
    h = Harness(pool_size=128)
    for i, p in enumerate(prompts(4, shared=4)):
        h.add(f"r{i}", p, max_new=6)
    h.run()
    assert h.sched.check_leak() is None
    assert h.sched.stats().cached > 0
    freed = h.sched.flush_cache()
    assert freed > 0
    assert h.sched.pool.available() == 127 and h.sched.cache.total_size() == 0


def test_lpm_admits_longest_cached_prefix_first():
    shared = [5] * 12
    order = {}
    for policy in ("fcfs", "lpm"):
        h = Harness(max_running_requests=1, schedule_policy=policy)
        h.add("warm", shared + [1], max_new=1)
        h.run()
        h.add("cold", [9, 9, 9], max_new=1)
        h.add("hot", shared + [2], max_new=1)
        h.run()
        order[policy] = [n.request_id for p in h.plans for n in p.new_requests][1:]
    assert order == {"fcfs": ["cold", "hot"], "lpm": ["hot", "cold"]}


def test_disable_radix_cache():
    h = Harness(pool_size=64, disable_radix_cache=True)
    shared = [3, 1, 4, 1, 5]
    h.add("a", shared + [1], max_new=3)
    h.run()
    h.add("b", shared + [2], max_new=3)
    h.run()
    assert h.new_plan_of("b").prefix_slots == [] and h.finals["b"].cached_tokens == 0
    assert h.sched.pool.available() == 63
    assert h.outputs["b"] == reference_tokens(shared + [2], 3)


def test_eos_and_stop_tokens():
    prompt = [1, 2, 3]
    ref = reference_tokens(prompt, 6)
    eos = ref[2]
    h = Harness(eos_token_ids=[eos])
    h.add("eos", prompt, max_new=6)
    h.add("ignore", prompt, max_new=6, ignore_eos=True)
    h.add("stop", prompt, max_new=6, stop_token_ids=(ref[1],))
    h.run()
    assert h.outputs["eos"] == ref[:3]
    assert (h.finals["eos"].finish_reason, h.finals["eos"].matched_stop_token_id) == (
        FinishReason.STOP,
        eos,
    )
    assert h.outputs["ignore"] == ref
    assert h.finals["ignore"].finish_reason == FinishReason.LENGTH
    assert h.outputs["stop"] == ref[:2] and h.finals["stop"].matched_stop_token_id == ref[1]


def test_validation_and_duplicates():
    h = Harness(pool_size=32, context_length=20)
    with pytest.raises(ValueError, match="context length"):
        h.add("long", [1] * 15, max_new=6)
    with pytest.raises(ValueError, match="at least one"):
        h.add("empty", [], max_new=1)
    assert "KV pool" in Scheduler(scheduler_config(max_running_requests=4), 16, 100).validate(
        10, 10
    )
    h.add("a", [1], max_new=2)
    with pytest.raises(DuplicateRequestError):
        h.add("a", [2], max_new=2)


def test_reset_drops_everything():
    h = Harness(pool_size=64)
    h.add("a", [1, 2, 3], max_new=10)
    h.add("b", [4], max_new=10)
    h.step()
    plan = h.sched.schedule()
    assert sorted(h.sched.reset()) == ["a", "b"]
    assert h.sched.pool.available() == 63 and not h.sched.has_work()
    assert h.sched.check_leak(deep=True) is None
    h.model.reqs.clear()
    h.add("c", [1, 2], max_new=2)
    h.run()
    assert plan is not None and h.outputs["c"] == reference_tokens([1, 2], 2)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    pool_size=st.integers(24, 96),
    policy=st.sampled_from(["fcfs", "lpm"]),
    max_running=st.integers(1, 6),
    chunk=CHUNK_SIZES,
    mixed=st.booleans(),
    page_size=PAGE_SIZES,
)
def test_random_traffic_never_leaks_and_matches_reference(
    seed, pool_size, policy, max_running, chunk, mixed, page_size
):
    rng = random.Random(seed)
    h = Harness(
        pool_size=max(pool_size, 3 * page_size),
        max_running_requests=max_running,
        max_prefill_tokens=16,
        schedule_policy=policy,
        schedule_conservativeness=rng.choice([0.0, 1.0]),
        chunked_prefill_size=chunk,
        enable_mixed_chunk=mixed,
        page_size=page_size,
    )
    expected, aborted = drive_random_traffic(h, rng, steps=200)
    check_random_traffic(h, expected, aborted, deep=False)
