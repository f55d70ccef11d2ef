"""LoRA in the scheduler core (pure Python, FakeModel checks every plan's KV): a step never names more
adapters than --max-loras-per-batch (requests of other adapters wait, and those of adapters already
running are admitted first), the same prompt under two adapters never reuses the other's cached KV (nor
the base model's), the plans carry each request's adapter, and an adapter's cache namespace is freed only
once no request uses it."""

import pytest

from radixserve.common.sampling import StoppingCriteria
from radixserve.scheduler.lora_admission import (
    adapter_fits,
    adapter_in_use,
    drop_adapter_cache,
    resident_first,
)
from radixserve.scheduler.request import Request
from tests.scheduler.harness import Harness, OverlapHarness


def add(h, rid, prompt, lora="", max_new=4):
    h.sched.add_request(Request(rid, list(prompt), StoppingCriteria(max_new), lora_name=lora))


def adapters_per_step(h) -> list[set[str]]:
    """The adapters each plan's requests run (new ones from the plan, continuing ones from the core)."""
    names = {}
    for plan in h.plans:
        for r in plan.new_requests:
            names[r.request_id] = r.lora_name
    return [{names[rid] for rid in plan.request_ids() if names.get(rid)} for plan in h.plans]


@pytest.mark.parametrize("harness", [Harness, OverlapHarness])
def test_a_step_runs_at_most_max_loras_adapters(harness):
    h = harness(max_loras_per_batch=2, enable_lora=True)
    add(h, "a1", [1, 2, 3], "a", max_new=6)
    add(h, "b1", [4, 5, 6], "b", max_new=6)
    add(h, "c1", [7, 8, 9], "c", max_new=2)  # waits: a and b fill the two slots
    add(h, "a2", [10, 11], "a", max_new=2)  # admitted past c1: a is running already
    add(h, "base", [12, 13], max_new=2)  # the base model takes no slot
    h.run()
    assert all(len(s) <= 2 for s in adapters_per_step(h))
    first = h.plans[0]
    assert [r.request_id for r in first.new_requests] == ["a1", "b1", "a2", "base"]
    assert {r.request_id: r.lora_name for r in first.new_requests}["b1"] == "b"
    assert set(h.finals) == {"a1", "b1", "c1", "a2", "base"}
    assert h.sched.check_leak(deep=True) is None


def test_without_lora_no_cap():
    h = Harness()
    for i, name in enumerate("abcdefghij"):
        add(h, f"r{i}", [i + 1, 2, 3], name)
    h.step()
    assert len(adapters_per_step(h)[0]) == 10


def test_same_prompt_under_two_adapters_shares_no_cached_kv():
    h = Harness(max_loras_per_batch=4, enable_lora=True)
    prompt = list(range(20, 40))
    for rid, lora in [("base", ""), ("x", "a"), ("y", "b"), ("x2", "a"), ("base2", "")]:
        add(h, rid, prompt, lora)
        h.run()
    cached = {rid: ev.cached_tokens for rid, ev in h.finals.items()}
    assert cached["base"] == cached["x"] == cached["y"] == 0
    assert cached["x2"] == cached["base2"] == len(prompt) - 1 > 0


def test_adapter_cache_is_freed_once_unused():
    h = Harness(max_loras_per_batch=2, enable_lora=True)
    add(h, "x", list(range(50, 60)), "a", max_new=3)
    h.step()
    assert adapter_in_use(h.sched, "a") and not adapter_in_use(h.sched, "b")
    assert not drop_adapter_cache(h.sched, "a")  # its request holds a locked prefix
    h.run()
    assert not adapter_in_use(h.sched, "a")
    free_before = h.sched.pool.available()
    assert h.sched.cache.total_size() > 0
    assert drop_adapter_cache(h.sched, "a")
    assert h.sched.cache.total_size() == 0 and h.sched.pool.available() > free_before
    assert h.sched.check_leak(deep=True) is None
    add(h, "x2", list(range(50, 60)), "a")
    h.run()
    assert h.finals["x2"].cached_tokens == 0


def test_admission_helpers():
    reqs = [Request(f"r{i}", [1], StoppingCriteria(1), lora_name=n) for i, n in enumerate("ab-c")]
    reqs[2].lora_name = ""
    assert [r.request_id for r in resident_first(reqs, {"b"})] == ["r1", "r2", "r0", "r3"]
    assert adapter_fits(reqs[0], {"a"}, 1) and not adapter_fits(reqs[1], {"a"}, 1)
    assert adapter_fits(reqs[2], {"a"}, 1) and adapter_fits(reqs[1], {"a"}, 2)
