"""The gateway over two data-parallel schedulers (--dp-size 2, fake backends): routing by prefix, one Session
stream per replica, /get_server_info per replica, /health over every replica, FlushCache on each."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from tests.gateway.fakes import FakeBackends, RunningGateway


@pytest.fixture(scope="module")
def replicas():
    pair = [FakeBackends(), FakeBackends()]
    yield pair
    for backends in pair:
        backends.stop()


@pytest.fixture(scope="module")
def gw(replicas):
    first, second = replicas
    addrs = SimpleNamespace(
        tokenizer_addr=first.tokenizer_addr,
        detokenizer_addr=first.detokenizer_addr,
        scheduler_addr=f"{first.scheduler_addr},{second.scheduler_addr}",
    )
    running = RunningGateway(addrs, dp_size=2)
    yield running
    running.close()


def generate(gw, text: str) -> dict:
    r = httpx.post(
        gw.base_url + "/generate",
        json={"text": text, "sampling_params": {"max_new_tokens": 4}},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()


def server_info(gw) -> dict:
    r = httpx.get(gw.base_url + "/get_server_info", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_requests_spread_and_a_repeated_prefix_stays_on_one_replica(gw, replicas):
    for word in ("alpha", "bravo", "charlie", "delta"):
        assert generate(gw, f"{word} {word}")["text"] == "The "
    assert all(len(b.scheduler.started) == 2 for b in replicas)  # distinct prompts: two each
    assert [b.scheduler.sessions for b in replicas] == [1, 1]  # one Session stream per replica

    shared = "You are a helpful assistant who answers in one word. " * 3
    before = [len(b.scheduler.started) for b in replicas]
    for question in ("Capital of France?", "Capital of Peru?", "Largest ocean?"):
        generate(gw, shared + question)
    gained = [len(b.scheduler.started) - n for b, n in zip(replicas, before)]
    assert sorted(gained) == [0, 3]

    info = server_info(gw)
    listed = info["scheduler"]["replicas"]
    assert [r["index"] for r in listed] == [0, 1] and all(r["reachable"] for r in listed)
    assert [r["addr"] for r in listed] == [b.scheduler_addr for b in replicas]
    assert sorted(int(r["routed_requests"]) for r in listed) == [2, 5]  # int64: a string in JSON
    assert (
        info["scheduler"]["max_total_tokens"]
        == sum(r["info"]["max_total_tokens"] for r in listed)
        == 8192
    )
    assert info["dp_size"] == 2 and info["load_balance_method"] == "cache_aware"


def test_flush_cache_reaches_every_replica(gw):
    r = httpx.post(gw.base_url + "/flush_cache", timeout=30)
    assert r.status_code == 200 and r.json() == {"freed_tokens": 14}  # 7 from each fake


def test_health_needs_every_replica_and_routing_avoids_a_dead_one(gw, replicas):
    assert httpx.get(gw.base_url + "/health", timeout=30).status_code == 200
    replicas[1].stop_scheduler()
    r = httpx.get(gw.base_url + "/health", timeout=30)
    assert (
        r.status_code == 503
        and f"replica 1 ({replicas[1].scheduler_addr})" in r.json()["error"]["message"]
    )
    started = len(replicas[0].scheduler.started)
    for word in ("echo", "foxtrot", "golf"):  # the failed probe marked replica 1 unavailable
        assert generate(gw, word)["text"] == "The "
    assert len(replicas[0].scheduler.started) == started + 3
    listed = server_info(gw)["scheduler"]["replicas"]
    assert (
        listed[0]["reachable"]
        and not listed[1]["reachable"]
        and "UNAVAILABLE" in listed[1]["error"]
    )
