"""The gateway's data-parallel router (services/gateway/pipeline/dp_router.py), its prefix trees and the merge of the
replicas' metrics, in process."""

from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from radixserve.gateway.pipeline.dp_router import DataParallelRouter
from radixserve.gateway.pipeline.prefix_tree import PrefixTree
from radixserve.gateway.pipeline.scheduler_replicas import merge_prometheus_texts


def prompt(seed: int, length: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(length)]


def route_and_finish(router: DataParallelRouter, ids: list[int]) -> int:
    replica = router.route(ids)
    router.finished(replica)
    return replica


def test_prefix_tree_matches_shared_prefixes_and_splits_edges():
    tree = PrefixTree(1000)
    tree.insert([1, 2, 3, 4, 5])
    tree.insert([1, 2, 9])
    assert tree.size == 6  # [1, 2] shared, then [3, 4, 5] and [9]
    assert tree.match([1, 2, 3, 4, 5, 6]) == 5
    assert tree.match([1, 2, 3, 7]) == 3
    assert tree.match([1, 2, 9, 9]) == 3
    assert tree.match([2, 1]) == 0 and tree.match([]) == 0


def test_prefix_tree_stays_within_its_bound_and_evicts_the_least_recently_used():
    tree = PrefixTree(max_tokens=500)
    kept = prompt(0, 100)
    for seed in range(1, 200):
        tree.insert(prompt(seed, 60))
        tree.insert(kept)  # used again and again: never the least recently used leaf
        assert tree.size <= 500
    assert tree.match(kept) == 100
    assert tree.match(prompt(1, 60)) < 60  # inserted first, long evicted
    assert tree.match(prompt(199, 60)) == 60  # the latest stays
    tree.insert(prompt(7, 2000))  # longer than the bound: at most the bound is kept
    assert tree.size <= 500


def test_a_repeated_prefix_goes_to_the_same_replica():
    router = DataParallelRouter(4, "cache_aware")
    for seed in range(8):  # other traffic first, so that the trees are not empty
        route_and_finish(router, prompt(seed))
    system = prompt(100, 200)
    first = route_and_finish(router, system + prompt(101, 10))
    for seed in range(102, 110):
        assert route_and_finish(router, system + prompt(seed, 10)) == first
    assert router.routed[first] >= 9


def test_distinct_prompts_spread_over_the_replicas():
    router = DataParallelRouter(4, "cache_aware")
    chosen = [route_and_finish(router, prompt(seed)) for seed in range(8)]
    assert sorted(set(chosen)) == [0, 1, 2, 3]
    assert router.routed == [
        2,
        2,
        2,
        2,
    ]  # the least-loaded replica with the smallest tree each time


def test_cache_aware_balances_when_the_load_is_too_uneven():
    router = DataParallelRouter(2, "cache_aware")
    shared = prompt(1, 100)
    hot = router.route(shared + [1])
    choices = [router.route(shared + [i + 2]) for i in range(40)]  # cache hits, all still running
    assert choices[:32] == [hot] * 32  # up to 33 in flight there the prefix decides
    assert (
        choices[32] == 1 - hot
    )  # 33 against 0: more than 32 apart (and 1.1 times), so the other replica
    assert router.inflight[hot] - router.inflight[1 - hot] <= 33


def test_shortest_queue_picks_the_idle_replica():
    router = DataParallelRouter(3, "shortest_queue")
    busy = [router.route(prompt(i)) for i in range(2)]
    assert sorted(busy) == [0, 1]
    assert router.route(prompt(9)) == 2  # the only idle one
    router.finished(1)
    assert router.route(prompt(10)) == 1
    assert router.inflight == [1, 1, 1]


def test_round_robin_takes_the_replicas_in_turn():
    router = DataParallelRouter(3, "round_robin")
    same = prompt(0)
    assert [router.route(same) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_an_unavailable_replica_is_left_out_unless_all_are():
    router = DataParallelRouter(2, "cache_aware")
    ids = prompt(3, 100)
    home = route_and_finish(router, ids)
    router.mark_unavailable(home)
    assert route_and_finish(router, ids) == 1 - home
    router.mark_unavailable(1 - home)
    assert route_and_finish(router, ids) in (0, 1)  # all unavailable: every replica is a candidate


def test_a_replica_that_passes_a_health_probe_is_routed_to_again_at_once():
    """A probe that failed while the replica was still starting must not keep it out once it answers."""
    router = DataParallelRouter(2, "round_robin")
    router.mark_unavailable(0)
    assert [route_and_finish(router, prompt(1)) for _ in range(2)] == [1, 1]
    router.mark_available(0)
    assert sorted(route_and_finish(router, prompt(1)) for _ in range(2)) == [0, 1]


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown load balance method"):
        DataParallelRouter(2, "random")


def test_replica_metrics_merge_into_one_exposition_labelled_by_replica():
    def text(running: int, hits: int) -> str:
        return (
            "# HELP radixserve:num_running_reqs Running requests.\n"
            "# TYPE radixserve:num_running_reqs gauge\n"
            f'radixserve:num_running_reqs{{model_name="m"}} {running}.0\n'
            "# HELP radixserve:cached_prompt_tokens_total Cached prompt tokens.\n"
            "# TYPE radixserve:cached_prompt_tokens_total counter\n"
            f"radixserve:cached_prompt_tokens_total {hits}.0\n"
        )

    merged = merge_prometheus_texts({0: text(3, 10), 1: text(5, 20)})
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    running = {
        s.labels["dp_rank"]: (s.labels["model_name"], s.value)
        for s in families["radixserve:num_running_reqs"].samples
    }
    assert running == {"0": ("m", 3.0), "1": ("m", 5.0)}
    hits = {
        s.labels["dp_rank"]: s.value for s in families["radixserve:cached_prompt_tokens"].samples
    }
    assert hits == {"0": 10.0, "1": 20.0}
    assert merged.count("# TYPE radixserve:num_running_reqs gauge") == 1


def test_one_replica_remembers_no_prompts():
    router = DataParallelRouter(1, "cache_aware")
    assert [router.route(list(range(i, i + 100))) for i in range(5)] == [0] * 5
    assert router.trees == []  # no per-request tree insert when there is nothing to choose
