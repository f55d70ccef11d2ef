"""--stream-interval N in the scheduler core: a request's tokens leave update() every N generated tokens,
its first token and its finish (stop, length, abort) at once, with every token's logprob; no network."""

from __future__ import annotations

import random

import pytest

from radixserve.common.step import SampledToken
from radixserve.scheduler.request import FinishReason, RequestEvent
from radixserve.scheduler.stream_interval import StreamBuffer
from tests.scheduler.harness import (
    Harness,
    OverlapHarness,
    check_random_traffic,
    drive_random_traffic,
    prompts,
    reference_tokens,
)


def step_event(rid: str, generated_before: int, tokens: list[int], finish=None) -> RequestEvent:
    return RequestEvent(
        rid,
        token_ids=list(tokens),
        finish_reason=finish,
        prompt_tokens=4,
        completion_tokens=generated_before + len(tokens),
    )


def run_counting(h: Harness) -> list[list[int]]:
    """Run h to the end; the token counts of each step's events, per step (empty: nothing released)."""
    per_step = []
    while (result := h.step()) is not None:
        per_step.append([len(ev.token_ids) for ev in result[1]])
    return per_step


def test_buffer_releases_first_token_then_every_n_then_the_finish():
    buf = StreamBuffer(4)
    released = []
    for i in range(10):
        finish = FinishReason.LENGTH if i == 9 else None
        released.append(buf.release([step_event("a", i, [100 + i], finish)]))
    sizes = [[len(e.token_ids) for e in out] for out in released]
    assert sizes == [[1], [], [], [], [4], [], [], [], [4], [1]]
    tokens = [t for out in released for e in out for t in e.token_ids]
    assert tokens == [100 + i for i in range(10)]
    last = released[-1][0]
    assert last.finish_reason == FinishReason.LENGTH and last.completion_tokens == 10
    assert not buf.held


def test_buffer_counts_tokens_not_steps():
    """A speculative step adds several tokens at once: N of them release at once."""
    buf = StreamBuffer(4)
    assert len(buf.release([step_event("a", 0, [1])])) == 1
    assert buf.release([step_event("a", 1, [2, 3])]) == []
    [out] = buf.release([step_event("a", 3, [4, 5, 6])])
    assert out.token_ids == [2, 3, 4, 5, 6] and out.completion_tokens == 6


def test_buffer_abort_flushes_held_tokens():
    buf = StreamBuffer(8)
    buf.release([step_event("a", 0, [1])])
    buf.release([step_event("a", 1, [2])])
    buf.release([step_event("a", 2, [3])])
    out = buf.flush(step_event("a", 3, [], FinishReason.ABORT))
    assert out.token_ids == [2, 3] and out.finish_reason == FinishReason.ABORT
    assert out.completion_tokens == 3 and not buf.held
    # Nothing held: the event as it is.
    alone = step_event("b", 0, [], FinishReason.ABORT)
    assert buf.flush(alone) is alone


def test_interval_one_passes_events_through():
    buf = StreamBuffer(1)
    events = [step_event("a", 1, [5]), step_event("b", 3, [6])]
    assert buf.release(events) is events and not buf.held


def test_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        StreamBuffer(0)


def test_core_streams_every_n_tokens_and_the_finish():
    h = Harness(stream_interval=4)
    h.add("a", [1, 2, 3, 4], max_new=10)
    per_step = run_counting(h)
    # Step 1 (prefill) samples the first token: sent at once; then 4, 4 and the finish with the rest.
    assert per_step == [[1], [], [], [], [4], [], [], [], [4], [1]]
    assert h.outputs["a"] == reference_tokens([1, 2, 3, 4], 10)
    final = h.finals["a"]
    assert final.finish_reason == FinishReason.LENGTH
    assert (final.prompt_tokens, final.completion_tokens) == (4, 10)


def test_core_finish_flushes_the_held_tokens():
    h = Harness(stream_interval=8)
    h.add("a", [1, 2, 3], max_new=6)
    per_step = run_counting(h)
    assert per_step == [[1], [], [], [], [], [5]]
    assert h.outputs["a"] == reference_tokens([1, 2, 3], 6)
    assert h.finals["a"].completion_tokens == 6


def test_core_stop_token_flushes_at_once():
    prompt = [1, 2, 3]
    ref = reference_tokens(prompt, 12)
    eos = ref[5]
    stop_at = ref.index(eos)  # the first occurrence ends the request
    h = Harness(stream_interval=16, eos_token_ids=[eos])
    h.add("a", prompt, max_new=12)
    h.run()
    assert h.outputs["a"] == ref[: stop_at + 1]
    final = h.finals["a"]
    assert final.finish_reason == FinishReason.STOP and final.matched_stop_token_id == eos
    assert final.completion_tokens == stop_at + 1


def test_core_abort_sends_the_held_tokens_with_the_abort():
    h = Harness(stream_interval=4)
    h.add("a", [1, 2, 3], max_new=20)
    for _ in range(3):
        h.step()
    assert h.outputs["a"] == reference_tokens([1, 2, 3], 1)  # only the first so far
    event = h.sched.abort("a")
    assert event.finish_reason == FinishReason.ABORT
    assert h.outputs["a"] + event.token_ids == reference_tokens([1, 2, 3], 3)
    assert event.completion_tokens == 3
    assert not h.sched.stream.held


def test_core_logprobs_travel_with_their_tokens():
    h = Harness(stream_interval=3)
    h.add("a", [1, 2, 3], max_new=7)
    released = []
    while (plan := h.sched.schedule()) is not None:
        outputs = [
            SampledToken(rid, tok, logprob=-0.5 - tok / 1000) for rid, tok in h.model.step(plan)
        ]
        released += h.sched.update(plan, outputs)
    tokens = [t for e in released for t in e.token_ids]
    assert tokens == reference_tokens([1, 2, 3], 7)
    assert [len(e.token_ids) for e in released] == [1, 3, 3]
    for event in released:
        assert [lp.token_id for lp in event.logprobs] == event.token_ids
        assert [round(lp.logprob, 6) for lp in event.logprobs] == [
            round(-0.5 - t / 1000, 6) for t in event.token_ids
        ]


def test_core_first_token_of_each_request_is_immediate_in_a_batch():
    h = Harness(stream_interval=5)
    for i, prompt in enumerate(prompts(3)):
        h.add(f"r{i}", prompt, max_new=9)
    _, events = h.step()  # one prefill of all three
    assert sorted((e.request_id, len(e.token_ids)) for e in events) == [
        ("r0", 1),
        ("r1", 1),
        ("r2", 1),
    ]
    h.run()
    for i, prompt in enumerate(prompts(3)):
        assert h.outputs[f"r{i}"] == reference_tokens(prompt, 9)


def test_held_tokens_survive_retraction():
    reqs = [(f"r{i}", p, 20) for i, p in enumerate(prompts(6, length=8, shared=3))]
    h = Harness(
        pool_size=48, schedule_conservativeness=0.0, min_new_token_ratio=0.0, stream_interval=3
    )
    for rid, prompt, max_new in reqs:
        h.add(rid, prompt, max_new=max_new, ignore_eos=True)
    h.run()
    assert h.sched.num_retractions > 0
    for rid, prompt, max_new in reqs:
        assert h.outputs[rid] == reference_tokens(prompt, max_new)
        assert h.finals[rid].completion_tokens == max_new


def test_reset_keeps_held_tokens_of_requests_that_stay_queued_only():
    h = Harness(stream_interval=4)
    h.add("a", [1, 2, 3], max_new=20)
    for _ in range(3):
        h.step()
    assert "a" in h.sched.stream.held
    h.sched.reset(keep_waiting=False)
    assert not h.sched.stream.held


@pytest.mark.parametrize("interval", [1, 2, 3, 7])
@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_with_overlap_matches_reference(interval, seed):
    rng = random.Random(seed)
    h = OverlapHarness(
        pool_size=64,
        max_running_requests=6,
        max_prefill_tokens=16,
        eos_token_ids=[0],
        schedule_conservativeness=rng.choice([0.0, 1.0]),
        stream_interval=interval,
    )
    expected, aborted = drive_random_traffic(h, rng, steps=150, eos={0})
    check_random_traffic(h, expected, aborted, deep=True, check_usage=True)
    finished = set(expected) - aborted
    assert finished <= set(h.finals)
    assert not h.sched.stream.held  # everything released or dropped
