"""The scheduler core in overlap mode: step N+1 is planned before step N's update, as the runtime does.

The FakeModel runs each plan only when its result is needed (the latest an executor could), so a
plan changed after it was handed out, or a slot reused too early, shows up as an error or a wrong
token. Every run is compared with the serial run of the same traffic.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from radixserve.common.sampling import StoppingCriteria
from radixserve.scheduler.request import FinishReason, Request
from tests.scheduler.harness import (
    CHUNK_SIZES,
    PAGE_SIZES,
    Harness,
    OverlapHarness,
    check_random_traffic,
    drive_random_traffic,
    final_fields,
    prompts,
    reference_tokens,
)


def run_both(traffic, **kwargs):
    """Run traffic [(rid, prompt, max_new, request kwargs)] serially and overlapped; return both."""
    runs = []
    for harness in (Harness(**kwargs), OverlapHarness(**kwargs)):
        for rid, prompt, max_new, extra in traffic:
            harness.add(rid, prompt, max_new=max_new, **extra)
        harness.run()
        runs.append(harness)
    return runs


def eos_traffic():
    """Requests ending on EOS, on a stop token, on max_new_tokens, and sharing prefixes."""
    shared = [3, 1, 4, 1, 5, 9, 2, 6]
    traffic = [(f"p{i}", shared + [20 + i], 12, {}) for i in range(4)]
    traffic += [(f"q{i}", p, 3 + i, {}) for i, p in enumerate(prompts(4, length=6, shared=2))]
    eos = {reference_tokens(shared + [20], 12)[4], reference_tokens(shared + [21], 12)[0]}
    stop = reference_tokens(shared + [22], 12)[6]
    traffic.append(("s", shared + [22], 12, {"stop_token_ids": (stop,)}))
    return traffic, eos


def test_mixed_finishes_match_serial_and_emit_nothing_extra():
    traffic, eos = eos_traffic()
    serial, overlap = run_both(traffic, eos_token_ids=eos)
    assert overlap.overlapped > 0
    assert dict(overlap.outputs) == dict(serial.outputs)
    assert final_fields(overlap) == final_fields(serial)
    reasons = {ev.finish_reason for ev in overlap.finals.values()}
    assert reasons == {FinishReason.STOP, FinishReason.LENGTH}
    assert (
        overlap.finals["p0"].completion_tokens == 5 and overlap.finals["p1"].completion_tokens == 1
    )
    for rid, prompt, max_new, extra in traffic:
        assert (
            overlap.outputs[rid] == reference_tokens(prompt, max_new)[: len(overlap.outputs[rid])]
        )


def test_eos_finish_was_planned_again_and_is_dropped_by_a_later_plan():
    prompt = [1, 2, 3]
    eos = reference_tokens(prompt, 5)[2]
    assert eos not in reference_tokens(prompt, 2) + reference_tokens([4], 10)
    h = OverlapHarness(eos_token_ids=[eos])
    h.add("a", prompt, max_new=5)
    h.add("b", [4], max_new=10)
    h.run()
    assert h.outputs["a"] == reference_tokens(prompt, 3)
    assert h.finals["a"].finish_reason == FinishReason.STOP and h.finals["a"].completion_tokens == 3
    planned = [i for i, p in enumerate(h.plans) if "a" in p.request_ids()]
    assert len(planned) == 4  # prefill + 2 decodes + 1 decode whose token is discarded
    dropped_by = [i for i, p in enumerate(h.plans) if "a" in p.finished_request_ids]
    assert len(dropped_by) == 1 and dropped_by[0] > planned[-1]
    assert h.outputs["b"] == reference_tokens([4], 10)


def test_max_new_tokens_finish_is_not_planned_again():
    h = OverlapHarness()
    h.add("a", [1, 2, 3], max_new=4)
    h.run()
    assert sum("a" in p.request_ids() for p in h.plans) == 4
    assert h.outputs["a"] == reference_tokens([1, 2, 3], 4)


def test_abort_with_two_steps_in_flight_frees_kv_after_the_last():
    h = OverlapHarness(pool_size=256)
    h.add("a", [1, 2, 3], max_new=50)
    h.add("b", [4, 5, 6], max_new=50)
    while len(h.in_flight) < 2 or not h.in_flight[1].continuing_requests:
        h.step()
    assert h.sched.abort("a").finish_reason == FinishReason.ABORT
    h.sched.add_request(Request("a", [7, 7], StoppingCriteria(2)))  # the id is free again at once
    assert h.sched.check_leak(deep=True) is None
    aborted = h.sched._releasing[0]
    held = list(aborted.slots)
    _, events = h.step()  # update of the older step
    assert [e.request_id for e in events] == ["b"] and aborted.slots == held
    _, events = h.step()  # plans again (new "a"), the other step is still in flight
    while h.in_flight and aborted.inflight:
        h.step()
    assert aborted.slots == [] and not h.sched._releasing
    h.sched.abort("b")
    h.run()
    assert h.outputs["a"] == reference_tokens([7, 7], 2)
    assert h.sched.stats().in_use == 0


def test_retraction_under_a_tiny_pool_matches_unconstrained():
    traffic = [
        (f"r{i}", p, 20, {"ignore_eos": True}) for i, p in enumerate(prompts(6, length=8, shared=3))
    ]
    serial, overlap = run_both(
        traffic, pool_size=48, schedule_conservativeness=0.0, min_new_token_ratio=0.0
    )
    assert overlap.sched.num_retractions > 0 and overlap.overlapped > 0
    assert dict(overlap.outputs) == dict(serial.outputs)
    for rid, prompt, max_new, _ in traffic:
        assert overlap.outputs[rid] == reference_tokens(prompt, max_new)
        assert overlap.finals[rid].finish_reason == FinishReason.LENGTH


def test_prefix_reuse_after_eos_finish_caches_as_serial():
    prompt = [9, 8, 7, 6]
    eos = reference_tokens(prompt, 6)[3]
    cached = []
    for harness in (Harness(eos_token_ids=[eos]), OverlapHarness(eos_token_ids=[eos])):
        harness.add("a", prompt, max_new=6)
        harness.run()
        harness.add("b", prompt + harness.outputs["a"] + [5], max_new=2)
        harness.run()
        cached.append(harness.finals["b"].cached_tokens)
    assert cached[0] == cached[1] == len(prompt) + 3


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    pool_size=st.integers(24, 96),
    policy=st.sampled_from(["fcfs", "lpm"]),
    max_running=st.integers(1, 6),
    chunk=CHUNK_SIZES,
    mixed=st.booleans(),
    page_size=PAGE_SIZES,
)
def test_random_traffic_overlapped_matches_reference(
    seed, pool_size, policy, max_running, chunk, mixed, page_size
):
    rng = random.Random(seed)
    eos = {rng.randrange(1000) for _ in range(40)}
    h = OverlapHarness(
        pool_size=max(pool_size, 3 * page_size),
        max_running_requests=max_running,
        max_prefill_tokens=16,
        schedule_policy=policy,
        schedule_conservativeness=rng.choice([0.0, 1.0]),
        eos_token_ids=eos,
        chunked_prefill_size=chunk,
        enable_mixed_chunk=mixed,
        page_size=page_size,
    )
    expected, aborted = drive_random_traffic(h, rng, steps=250, eos=eos)
    check_random_traffic(h, expected, aborted, deep=True, check_usage=True)
