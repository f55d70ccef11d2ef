"""The prefix cache's LoRA namespaces: the same tokens under two adapters (or an adapter and the base
model) never share KV; namespaces evict, lock and free like the base tree, and an empty one is dropped."""

import pytest

from radixserve.scheduler.radix_cache import DisabledRadixCache, PagedRadixCache, RadixCache


@pytest.fixture(params=[1, 2], ids=["tokens", "pages"])
def cache(request):
    return RadixCache() if request.param == 1 else PagedRadixCache(2)


def test_same_tokens_under_two_adapters_share_nothing(cache):
    tokens = [1, 2, 3, 4]
    assert cache.insert(tokens, [10, 11, 12, 13]) == 0
    assert cache.insert(tokens, [20, 21, 22, 23], "a") == 0  # nothing cached under "a" yet
    assert cache.insert(tokens, [30, 31, 32, 33], "b") == 0
    assert cache.match_prefix(tokens + [9, 9])[0] == [10, 11, 12, 13]
    assert cache.match_prefix(tokens + [9, 9], "a")[0] == [20, 21, 22, 23]
    assert cache.match_prefix(tokens + [9, 9], "b")[0] == [30, 31, 32, 33]
    assert cache.match_prefix(tokens, "c")[0] == []
    assert cache.insert(tokens, [40, 41, 42, 43], "a") == 4  # cached already, in "a"
    assert cache.total_size() == cache.evictable_size() == 12
    assert sorted(cache.all_slots()) == [10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33]


def test_namespaces_lock_evict_and_drop(cache):
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13], "a")
    cache.insert([5, 6], [20, 21])
    slots, node = cache.match_prefix([1, 2, 3, 4, 7, 7], "a")
    cache.inc_lock_ref(node)
    assert cache.protected_size() == 4 and cache.evictable_size() == 2
    freed: list[int] = []
    assert cache.evict(100, freed.extend) == 2 and freed == [20, 21]  # "a" is locked
    assert not cache.drop_namespace("a")  # holds tokens
    cache.dec_lock_ref(node)
    assert cache.evict(100, freed.extend) == 4 and sorted(freed) == [10, 11, 12, 13, 20, 21]
    assert cache.total_size() == 0 and cache.all_slots() == []
    assert cache.drop_namespace("a") and not cache.drop_namespace("a")
    assert list(cache.root.children) == []


def test_match_in_an_empty_namespace_locks_harmlessly(cache):
    slots, node = cache.match_prefix([1, 2], "x")
    assert slots == []
    cache.inc_lock_ref(node)
    cache.dec_lock_ref(node)
    assert cache.total_size() == 0 and cache.evict(10, lambda s: None) == 0
    assert cache.drop_namespace("x")


def test_disabled_cache_takes_namespaces():
    cache = DisabledRadixCache()
    assert cache.match_prefix([1, 2], "a")[0] == []
    assert cache.insert([1, 2], [3, 4], "a") == 2
    assert cache.drop_namespace("a")


def test_drop_namespace_frees_its_tokens(cache):
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13], "a")
    cache.insert([1, 2, 5, 6], [20, 21, 22, 23], "a")
    cache.insert([1, 2], [30, 31])
    _, node = cache.match_prefix([1, 2, 5, 6, 7, 7], "a")
    cache.inc_lock_ref(node)
    freed: list[int] = []
    assert not cache.drop_namespace("a", freed.extend) and freed == []
    cache.dec_lock_ref(node)
    assert cache.drop_namespace("a", freed.extend)
    assert sorted(freed) == [10, 11, 12, 13, 22, 23]
    assert cache.total_size() == cache.evictable_size() == 2 and cache.all_slots() == [30, 31]
