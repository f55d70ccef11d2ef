"""Chunked prefill, mixed prefill+decode steps and page-granular KV in the scheduler core.

Driven by the FakeModel, which runs chunks as the executor does, checks every slot it writes
(with page_size > 1, its page layout too) and samples tokens that depend on the whole sequence,
so a wrong chunk, slot or prefix shows up as an error or as a token that differs from the reference.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from radixserve.v1 import scheduler_pb2
from radixserve.scheduler.kv_pool import DoubleFreeError, PagedKVPool
from radixserve.common.step import ContinuingRequest, NewRequest, SampledToken
from tests.scheduler.harness import Harness, OverlapHarness, final_fields, prompts, reference_tokens


def chunks_of(harness, rid):
    """Every prefill piece planned for rid, in order: NewRequest, then ContinuingRequests."""
    out = []
    for plan in harness.plans:
        out += [n for n in plan.new_requests if n.request_id == rid]
        out += [c for c in plan.continuing_requests if c.request_id == rid and c.input_ids]
    return out


def decodes_of(plan):
    return [c.request_id for c in plan.continuing_requests if not c.input_ids]


def prefill_tokens(plan):
    return sum(len(n.input_ids) for n in plan.new_requests) + sum(
        len(c.input_ids) for c in plan.continuing_requests if c.input_ids
    )


def check_page_layout(slots, page_size):
    """Token i at offset i % page_size of a page, contiguous within each page, page 0 unused."""
    for i, slot in enumerate(slots):
        assert slot >= page_size, f"slot {slot} is in page 0"
        assert slot % page_size == i % page_size, (i, slots)
        if i % page_size:
            assert slot == slots[i - 1] + 1, (i, slots)


# ---- chunked prefill ----------------------------------------------------------------------------


def test_long_prompt_is_split_into_chunks_of_the_budget():
    prompt = [(7 * i) % 11 for i in range(30)]
    chunked = Harness(chunked_prefill_size=8)
    whole = Harness()
    for h in (chunked, whole):
        h.add("a", prompt, max_new=4)
        h.run()
    pieces = chunks_of(chunked, "a")
    assert isinstance(pieces[0], NewRequest)
    assert all(isinstance(p, ContinuingRequest) for p in pieces[1:])
    assert [len(p.input_ids) for p in pieces] == [8, 8, 8, 6]
    assert [p.sample for p in pieces] == [False, False, False, True]
    assert all(len(p.new_slots) == len(p.input_ids) for p in pieces)
    # The chunks together run exactly what the unchunked prefill runs, in the same slots.
    unchunked = whole.new_plan_of("a")
    assert [t for p in pieces for t in p.input_ids] == unchunked.input_ids == prompt
    assert [s for p in pieces for s in p.new_slots] == unchunked.new_slots
    assert chunked.outputs["a"] == whole.outputs["a"] == reference_tokens(prompt, 4)
    # Chunks that do not sample produce no event; usage counts the prompt once.
    assert len(chunked.plans) == 4 + 3
    final = chunked.finals["a"]
    assert (final.prompt_tokens, final.completion_tokens, final.cached_tokens) == (30, 4, 0)
    assert chunked.sched.total_prompt_tokens == 30


def test_budget_is_the_smaller_of_max_prefill_tokens_and_chunk_size():
    for kwargs in (
        {"max_prefill_tokens": 5, "chunked_prefill_size": 100},
        {"max_prefill_tokens": 100, "chunked_prefill_size": 5},
    ):
        h = Harness(**kwargs)
        h.add("a", list(range(12)), max_new=2)
        h.run()
        assert [len(p.input_ids) for p in chunks_of(h, "a")] == [5, 5, 2]


def test_step_budget_is_shared_and_the_chunked_request_goes_first():
    h = Harness(chunked_prefill_size=8)
    h.add("short", [1] * 5, max_new=3)
    h.add("long", [2] * 20, max_new=3)
    h.add("next", [3] * 4, max_new=3)
    plan, _ = h.step()
    # The budget left after "short" (3 tokens) starts "long"; nothing more joins the step.
    assert [(n.request_id, len(n.input_ids), n.sample) for n in plan.new_requests] == [
        ("short", 5, True),
        ("long", 3, False),
    ]
    assert h.sched.chunked.request_id == "long" and [r.request_id for r in h.sched.waiting] == [
        "next"
    ]
    while h.sched.chunked is not None:
        plan, _ = h.step()
        assert plan.continuing_requests[0].request_id == "long"
        assert not decodes_of(plan)  # without mixing, the decode of "short" waits
    # The last chunk (1 token) samples, and "next" is admitted into the rest of that step's budget.
    assert [(c.request_id, len(c.input_ids), c.sample) for c in plan.continuing_requests] == [
        ("long", 1, True)
    ]
    assert [(n.request_id, n.sample) for n in plan.new_requests] == [("next", True)]
    h.run()
    for p in h.plans:
        assert prefill_tokens(p) <= 8
    for rid, prompt in (("short", [1] * 5), ("long", [2] * 20), ("next", [3] * 4)):
        assert h.outputs[rid] == reference_tokens(prompt, 3)


def test_only_one_request_is_chunked_at_a_time():
    h = Harness(chunked_prefill_size=4)
    for i, prompt in enumerate(prompts(3, length=10)):
        h.add(f"r{i}", prompt, max_new=2)
    seen = []
    while h.step() is not None:
        in_prefill = {p.request_id for p in h.plans[-1].new_requests if not p.sample}
        in_prefill |= {
            c.request_id for c in h.plans[-1].continuing_requests if c.input_ids and not c.sample
        }
        assert len(in_prefill) <= 1
        seen.append(h.sched.chunked.request_id if h.sched.chunked else None)
        assert len(h.sched.running) + (h.sched.chunked is not None) <= h.sched.max_running_requests
    assert not h.sched.has_work()
    assert {"r0", "r1", "r2"} <= set(seen)
    for i, prompt in enumerate(prompts(3, length=10)):
        assert h.outputs[f"r{i}"] == reference_tokens(prompt, 2)


def test_chunked_prefill_reuses_a_cached_prefix():
    shared = list(range(40, 52))
    h = Harness(chunked_prefill_size=5)
    h.add("warm", shared + [1], max_new=2)
    h.run()
    h.add("b", shared + list(range(60, 71)), max_new=3)
    h.run()
    pieces = chunks_of(h, "b")
    warm_slots = [s for p in chunks_of(h, "warm") for s in p.new_slots]
    assert pieces[0].prefix_slots == warm_slots[: len(shared)]
    assert [len(p.input_ids) for p in pieces] == [5, 5, 1]
    assert h.finals["b"].cached_tokens == len(shared)
    assert h.outputs["b"] == reference_tokens(shared + list(range(60, 71)), 3)


def test_abort_mid_chunk_frees_everything():
    shared = list(range(10, 18))
    h = Harness(pool_size=128, chunked_prefill_size=4)
    h.add("warm", shared + [1], max_new=1)
    h.run()
    h.add("a", shared + list(range(30, 50)), max_new=5)
    h.step()
    h.step()
    assert h.sched.chunked is not None and h.sched.cache.protected_size() == len(shared)
    assert h.sched.stats().in_use == len(shared) + 8
    ev = h.sched.abort("a")
    assert ev.finished and ev.completion_tokens == 0 and ev.prompt_tokens == 28
    assert h.sched.chunked is None and not h.sched.has_work()
    assert h.sched.check_leak(deep=True) is None
    stats = h.sched.stats()
    assert stats.in_use == 0 and stats.free + stats.cached == 127
    # The computed chunks went to the cache; the executor is told to drop the request.
    assert stats.cached == len(shared) + 1 + 8
    h.add("b", [5], max_new=2)
    plan, _ = h.step()
    assert plan.finished_request_ids == ["a"]
    h.run()


def test_abort_with_chunks_in_flight_waits_for_them():
    h = OverlapHarness(pool_size=128, chunked_prefill_size=4)
    h.add("a", list(range(1, 21)), max_new=5)
    h.step()
    h.step()  # two chunks of "a" in flight, neither samples
    assert [len(p.new_requests) + len(p.continuing_requests) for p in h.in_flight] == [1, 1]
    assert h.sched.abort("a").finished
    assert h.sched.check_leak(deep=True) is None
    aborted = h.sched._releasing[0]
    assert aborted.chunks_inflight == 2 and len(aborted.slots) == 8
    _, events = h.step()
    assert events == [] and aborted.slots  # the second chunk still writes its KV
    _, events = h.step()
    assert events == [] and aborted.slots == [] and not h.sched._releasing
    assert h.sched.check_leak(deep=True) is None and h.sched.stats().in_use == 0
    h.run()


def test_next_chunk_is_planned_while_the_previous_runs():
    h = Harness(chunked_prefill_size=4)
    prompt = list(range(1, 11))
    h.add("a", prompt, max_new=3)
    first, second, third = h.sched.schedule(), h.sched.schedule(), h.sched.schedule()
    assert [p.request_ids() for p in (first, second, third)] == [["a"], ["a"], ["a"]]
    assert [c.sample for c in second.continuing_requests + third.continuing_requests] == [
        False,
        True,
    ]
    # A decode can follow the last chunk before its result, as after an unchunked prefill.
    fourth = h.sched.schedule()
    assert decodes_of(fourth) == ["a"]
    tokens = []
    for plan in (first, second, third, fourth):
        outputs = [SampledToken(rid, tok) for rid, tok in h.model.step(plan)]
        assert len(outputs) == (plan in (third, fourth))
        tokens += [t for ev in h.sched.update(plan, outputs) for t in ev.token_ids]
        assert h.sched.check_leak(deep=True) is None
    assert tokens == reference_tokens(prompt, 2)


def test_retraction_takes_the_chunked_request_first():
    # No reservation for future tokens: the mixed decodes of "a" and the chunks of "b" outgrow the pool.
    h = Harness(
        pool_size=33,
        chunked_prefill_size=4,
        enable_mixed_chunk=True,
        schedule_conservativeness=0.0,
        min_new_token_ratio=0.0,
    )
    h.add("a", list(range(1, 11)), max_new=22, ignore_eos=True)
    h.step()
    h.add("b", list(range(30, 50)), max_new=1, ignore_eos=True)
    while h.sched.num_retractions == 0:
        h.step()
    assert [r.request_id for r in h.sched.running] == ["a"]
    assert [r.request_id for r in h.sched.waiting] == ["b"] and h.sched.chunked is None
    assert h.outputs["b"] == [] and "b" in h.plans[-1].finished_request_ids
    h.run()
    assert h.outputs["a"] == reference_tokens(list(range(1, 11)), 22)
    assert h.outputs["b"] == reference_tokens(list(range(30, 50)), 1)
    assert h.finals["b"].prompt_tokens == 20 and h.sched.total_prompt_tokens == 30


# ---- mixed steps ----------------------------------------------------------------------------


def test_mixed_steps_carry_the_chunk_and_every_decode():
    h = Harness(chunked_prefill_size=6, enable_mixed_chunk=True)
    h.add("a", [1, 2, 3], max_new=30)
    h.add("b", [4, 5], max_new=30)
    h.step()
    h.add("long", list(range(100, 120)), max_new=2)
    mixed_steps = 0
    while h.sched.chunked is not None or not h.outputs["long"]:
        before = {rid: len(h.outputs[rid]) for rid in "ab"}
        plan, _ = h.step()
        assert chunks_of_plan(plan) == ["long"]
        assert sorted(decodes_of(plan)) == ["a", "b"]
        assert prefill_tokens(plan) + len(decodes_of(plan)) <= 6
        assert all(len(h.outputs[rid]) == before[rid] + 1 for rid in "ab")
        mixed_steps += 1
    assert [len(p.input_ids) for p in chunks_of(h, "long")] == [4, 4, 4, 4, 4]
    assert mixed_steps == 5
    h.run()
    assert h.outputs["a"] == reference_tokens([1, 2, 3], 30)
    assert h.outputs["b"] == reference_tokens([4, 5], 30)
    assert h.outputs["long"] == reference_tokens(list(range(100, 120)), 2)


def chunks_of_plan(plan):
    return [n.request_id for n in plan.new_requests] + [
        c.request_id for c in plan.continuing_requests if c.input_ids
    ]


def test_without_mixing_a_step_is_prefill_or_decode():
    h = Harness(chunked_prefill_size=6)
    h.add("a", [1, 2, 3], max_new=10)
    h.step()
    h.add("long", list(range(100, 120)), max_new=2)
    h.run()
    assert all(not (chunks_of_plan(p) and decodes_of(p)) for p in h.plans)
    assert h.outputs["a"] == reference_tokens([1, 2, 3], 10)


def test_mixing_falls_back_to_a_plain_prefill_when_decodes_fill_the_budget():
    h = Harness(chunked_prefill_size=3, enable_mixed_chunk=True)
    for rid, prompt in (("a", [1]), ("b", [2]), ("c", [3])):
        h.add(rid, prompt, max_new=5)
    h.step()
    h.add("d", [4, 5], max_new=2)
    plan, _ = h.step()
    assert chunks_of_plan(plan) == ["d"] and not decodes_of(plan)
    h.run()
    assert h.outputs["d"] == reference_tokens([4, 5], 2)


# ---- pages ----------------------------------------------------------------------------------


def test_paged_pool_fills_the_last_page_before_opening_new_ones():
    pool = PagedKVPool(size=4 * 8 + 3, page_size=4)  # pages 1..7; slots 32-34 are a partial page
    assert (pool.capacity, pool.available()) == (28, 28)
    first = pool.extend([], 6)
    assert first == [4, 5, 6, 7, 8, 9] and pool.available() == 20
    assert pool.slots_needed(6, 3) == 4 and pool.slots_needed(6, 2) == 0
    more = pool.extend(first, 3)
    assert more == [10, 11, 12] and pool.available() == 16
    held = first + more

    class Holder:
        def __init__(self, slots):
            self.slots = slots

    holders = [Holder(held), Holder(pool.extend([], 4)), Holder(pool.extend([], 1))]
    assert [h.slots for h in holders[1:]] == [[16, 17, 18, 19], [20]] and pool.available() == 8
    assert pool.decode_need(holders) == 4  # only the full page needs a new one
    assert pool.alloc_decode(holders) == [13, 24, 21] and pool.available() == 4
    with pytest.raises(ValueError, match="not laid out by pages"):
        pool.free([4, 5, 7])
    pool.free(held)
    with pytest.raises(DoubleFreeError):
        pool.free([4, 5, 6, 7])
    assert pool.extend([], 100) is None


@pytest.mark.parametrize("page_size", [4, 16])
def test_page_layout_of_every_request(page_size):
    h = Harness(pool_size=512, page_size=page_size, chunked_prefill_size=7, enable_mixed_chunk=True)
    shared = list(range(200, 219))
    for i in range(6):
        h.add(f"r{i}", shared + [i] * (i + 1), max_new=9)
        h.step()
    slots: dict[str, list[int]] = {}
    for plan in h.plans:
        for n in plan.new_requests:
            slots[n.request_id] = list(n.prefix_slots) + list(n.new_slots)
        for c in plan.continuing_requests:
            slots[c.request_id] += c.new_slots
    h.run()
    for rid, s in slots.items():
        check_page_layout(s, page_size)
    for i in range(6):
        assert h.outputs[f"r{i}"] == reference_tokens(shared + [i] * (i + 1), 9)


def test_prefix_reuse_is_in_whole_pages():
    page = 4
    h = Harness(pool_size=256, page_size=page)
    shared = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # 10 tokens: two whole pages and a part
    h.add("a", shared + [10, 11], max_new=3)
    h.run()
    # "a" ran 14 tokens; 12 of them (3 pages) hold KV the cache can keep, the 4th page is freed.
    assert h.sched.stats().cached == 12
    h.add("b", shared + [20], max_new=3)
    h.run()
    a_new, b_new = h.new_plan_of("a"), h.new_plan_of("b")
    assert b_new.prefix_slots == a_new.new_slots[:8]
    assert b_new.input_ids == shared[8:] + [20]
    check_page_layout(b_new.prefix_slots + b_new.new_slots, page)
    assert h.finals["b"].cached_tokens == 8
    assert h.outputs["b"] == reference_tokens(shared + [20], 3)
    stats = h.sched.stats()
    assert stats.cached % page == 0 and stats.free % page == 0
    assert stats.cached + stats.free == stats.pool_tokens == 252


def test_pool_counts_slots_but_allocates_pages():
    h = Harness(
        pool_size=66, page_size=16
    )  # pages 1..3: page 0 holds slot 0, slots 64-65 are left over
    assert h.sched.stats().pool_tokens == h.sched.pool.capacity == 48
    assert "KV pool (48 tokens)" in h.sched.validate(40, 10)
    h.add("a", [1] * 5, max_new=3)
    plan, _ = h.step()
    assert plan.new_requests[0].new_slots == list(range(16, 21))
    stats = h.sched.stats()
    assert (stats.free, stats.in_use) == (32, 16)  # 5 tokens take a whole page
    h.run()
    stats = h.sched.stats()
    assert (stats.free, stats.cached) == (48, 0)  # 7 tokens: no whole page to cache
    h.add("b", [2] * 17, max_new=20)
    h.run()
    assert h.outputs["b"] == reference_tokens([2] * 17, 20)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_eviction_and_retraction_with_pages(page_size):
    traffic = [
        (f"r{i}", p, 20, {"ignore_eos": True}) for i, p in enumerate(prompts(6, length=8, shared=3))
    ]
    for harness_cls in (Harness, OverlapHarness):
        h = harness_cls(
            pool_size=48 + 3 * page_size,
            page_size=page_size,
            chunked_prefill_size=5,
            schedule_conservativeness=0.0,
            min_new_token_ratio=0.0,
        )
        for rid, prompt, max_new, extra in traffic:
            h.add(rid, prompt, max_new=max_new, **extra)
        h.run()
        assert h.sched.num_retractions > 0
        for rid, prompt, max_new, _ in traffic:
            assert h.outputs[rid] == reference_tokens(prompt, max_new)
        h.sched.flush_cache()
        assert h.sched.pool.available() == h.sched.pool.capacity


# ---- everything together ----------------------------------------------------------------------


def mode_traffic():
    shared = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 9, 8]
    traffic = [(f"s{i}", shared + [20 + i] * (i + 1), 6 + i, {}) for i in range(5)]
    traffic += [(f"p{i}", p, 4 + i, {}) for i, p in enumerate(prompts(4, length=23, shared=5))]
    traffic.append(("one", [42], 3, {}))
    return traffic


def run_mode(overlap, **kwargs):
    h = (OverlapHarness if overlap else Harness)(pool_size=1024, max_running_requests=4, **kwargs)
    for i, (rid, prompt, max_new, extra) in enumerate(mode_traffic()):
        h.add(rid, prompt, max_new=max_new, ignore_eos=True, **extra)
        if i % 3 == 0:
            h.step()  # some requests arrive while others run
    h.run()
    return h


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize(
    "chunk,mixed", [(-1, False), (-1, True), (5, False), (5, True), (16, True)]
)
def test_greedy_outputs_are_identical_in_every_mode(overlap, page_size, chunk, mixed):
    h = run_mode(overlap, page_size=page_size, chunked_prefill_size=chunk, enable_mixed_chunk=mixed)
    for rid, prompt, max_new, _ in mode_traffic():
        assert h.outputs[rid] == reference_tokens(prompt, max_new), rid
        assert h.finals[rid].prompt_tokens == len(prompt)
        assert h.finals[rid].completion_tokens == max_new
    if chunk > 0:
        assert any(not n.sample for p in h.plans for n in p.new_requests)
    if mixed:
        assert any(chunks_of_plan(p) and decodes_of(p) for p in h.plans)


def test_overlapped_chunked_mixed_paged_run_matches_serial():
    kwargs = dict(
        pool_size=96,
        page_size=4,
        chunked_prefill_size=6,
        enable_mixed_chunk=True,
        max_running_requests=4,
        schedule_conservativeness=0.0,
        min_new_token_ratio=0.0,
    )
    eos = {reference_tokens([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 9, 8, 21, 21], 8)[2]}
    runs = []
    for harness_cls in (Harness, OverlapHarness):
        h = harness_cls(eos_token_ids=eos, **kwargs)
        for rid, prompt, max_new, extra in mode_traffic():
            h.add(rid, prompt, max_new=max_new, **extra)
        h.run()
        runs.append(h)
    serial, overlap = runs
    assert overlap.overlapped > 0
    assert dict(overlap.outputs) == dict(serial.outputs)
    assert final_fields(overlap) == final_fields(serial)


# ---- the server wires the flags ---------------------------------------------------------------


def test_server_runs_chunked_mixed_paged():
    from tests.scheduler.server_stack import collect, gen_request, run, stack

    async def body():
        async with stack(chunked_prefill_size=8, enable_mixed_chunk=True, page_size=4) as (
            stub,
            executor,
            sched,
        ):
            executor.model.page_size = 4  # the fake checks the page layout of every slot
            core = sched.runtime.core
            assert (core.prefill_budget, core.enable_mixed_chunk, core.page_size) == (8, True, 4)
            info = await stub.GetInfo(scheduler_pb2.SchedulerInfoRequest())
            config = json.loads(info.config_json)
            assert (
                config["page_size"],
                config["chunked_prefill"],
                config["enable_mixed_chunk"],
            ) == (4, True, True)
            assert info.max_total_tokens % 4 == 0
            requests = [gen_request(f"r{i}", list(range(i, i + 30)), max_new=6) for i in range(3)]
            streams = await asyncio.gather(*(collect(stub, r) for r in requests))
            for i, msgs in enumerate(streams):
                assert [t for m in msgs for t in m.token_ids] == reference_tokens(
                    list(range(i, i + 30)), 6
                )
            assert any(not n.sample for p in executor.model.steps for n in p.new_requests)

    run(body())
