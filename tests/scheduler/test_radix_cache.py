"""RadixCache and PagedRadixCache: exact hand cases and hypothesis state-machine invariants
against a dict model."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pytest

from radixserve.scheduler.radix_cache import DisabledRadixCache, PagedRadixCache, RadixCache


def test_insert_returns_shared_prefix_and_keeps_first_slots():
    cache = RadixCache()
    assert cache.insert([1, 2, 3], [10, 11, 12]) == 0
    assert cache.insert([1, 2, 4], [20, 21, 22]) == 2
    assert cache.match_prefix([1, 2, 4, 5])[0] == [10, 11, 22]
    assert cache.match_prefix([1, 2, 3])[0] == [10, 11, 12]
    assert sorted(cache.all_slots()) == [10, 11, 12, 22]
    assert cache.total_size() == cache.evictable_size() == 4
    upper = cache.root.children[1]
    assert upper.key == [1, 2] and upper.slots == [10, 11]
    assert sorted(upper.children) == [3, 4]


def test_insert_of_cached_sequence_reports_all_tokens():
    cache = RadixCache()
    cache.insert([5, 6, 7], [1, 2, 3])
    assert cache.insert([5, 6], [8, 9]) == 2
    assert cache.insert([5, 6, 7], [8, 9, 10]) == 3
    assert cache.total_size() == 3


def test_match_splits_node_in_the_middle():
    cache = RadixCache()
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    slots, node = cache.match_prefix([1, 2, 9])
    assert slots == [10, 11]
    assert node.key == [1, 2] and node.slots == [10, 11]
    assert list(node.children) == [3]
    assert node.children[3].key == [3, 4] and node.children[3].slots == [12, 13]
    assert cache.total_size() == 4
    assert cache.match_prefix([1, 2, 3, 4, 5])[0] == [10, 11, 12, 13]


def test_match_of_unknown_prefix_is_empty_root():
    cache = RadixCache()
    cache.insert([1, 2], [3, 4])
    slots, node = cache.match_prefix([2, 1])
    assert slots == [] and node is cache.root
    assert cache.match_prefix([])[0] == []


def test_lru_eviction_order():
    cache = RadixCache()
    cache.insert([1, 2], [10, 11])
    cache.insert([3, 4], [20, 21])
    cache.insert([5], [30])
    cache.match_prefix([1, 2])  # [1, 2] is now the most recently used
    freed: list[list[int]] = []
    assert cache.evict(2, freed.append) == 2
    assert freed == [[20, 21]]
    assert cache.evict(1, freed.append) == 1
    assert freed[-1] == [30]
    assert cache.evict(5, freed.append) == 2
    assert freed[-1] == [10, 11]
    assert cache.total_size() == 0


def test_eviction_climbs_to_parent_once_it_becomes_a_leaf():
    cache = RadixCache()
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([1, 2, 4], [20, 21, 22])
    freed: list[list[int]] = []
    assert cache.evict(3, freed.append) == 4
    assert freed == [[12], [22], [10, 11]]


def test_locked_path_is_not_evicted_and_counts_as_protected():
    cache = RadixCache()
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([1, 2, 4], [20, 21, 22])
    _, node = cache.match_prefix([1, 2, 3])
    cache.inc_lock_ref(node)
    assert cache.protected_size() == 3 and cache.evictable_size() == 1
    freed: list[list[int]] = []
    assert cache.evict(100, freed.append) == 1
    assert freed == [[22]]
    cache.dec_lock_ref(node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 3
    assert cache.evict(100, freed.append) == 3


def test_split_of_locked_node_keeps_lock_accounting():
    cache = RadixCache()
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    _, node = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(node)
    cache.match_prefix([1, 2])  # splits the locked node
    assert cache.protected_size() == 4 and cache.evictable_size() == 0
    cache.dec_lock_ref(node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 4


def test_disabled_cache_caches_nothing():
    cache = DisabledRadixCache()
    assert cache.insert([1, 2, 3], [4, 5, 6]) == 3
    slots, node = cache.match_prefix([1, 2, 3])
    assert slots == []
    cache.inc_lock_ref(node)
    cache.dec_lock_ref(node)
    assert cache.evict(10, lambda s: None) == 0
    assert cache.total_size() == cache.evictable_size() == cache.protected_size() == 0


def test_paged_match_is_rounded_down_to_whole_pages():
    cache = PagedRadixCache(4)
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], list(range(16, 24)))
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7])[0] == [16, 17, 18, 19]
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 9, 9])[0] == [16, 17, 18, 19]
    assert cache.match_prefix([1, 2, 3])[0] == []
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9])[0] == list(range(16, 24))


def test_paged_insert_shares_whole_pages_only():
    cache = PagedRadixCache(2)
    assert cache.insert([1, 2, 3, 4], [10, 11, 12, 13]) == 0
    # [3, 5] differs from the cached page [3, 4] inside the page: a new page, not a split.
    assert cache.insert([1, 2, 3, 5], [20, 21, 22, 23]) == 2
    assert cache.match_prefix([1, 2, 3, 5])[0] == [10, 11, 22, 23]
    assert sorted(cache.all_slots()) == [10, 11, 12, 13, 22, 23]
    upper = cache.root.children[(1, 2)]
    assert upper.key == [1, 2] and sorted(upper.children) == [(3, 4), (3, 5)]
    with pytest.raises(ValueError, match="whole number of pages"):
        cache.insert([1, 2, 3], [30, 31, 32])


def test_paged_eviction_frees_whole_pages():
    cache = PagedRadixCache(4)
    cache.insert(list(range(8)), list(range(4, 12)))
    cache.insert(list(range(4)) + [9] * 4, list(range(4, 8)) + list(range(12, 16)))
    freed: list[list[int]] = []
    assert cache.evict(1, freed.append) == 4
    assert cache.evict(100, freed.append) == 8
    assert all(len(f) % 4 == 0 and f[0] % 4 == 0 for f in freed)
    assert cache.total_size() == 0


tokens_st = st.lists(st.integers(0, 3), min_size=1, max_size=6)


class _LockingMachine(RuleBasedStateMachine):
    """Rules both caches share: lock a matched path, unlock it, evict; locked paths keep matching.
    Subclasses hold the reference model (self.ref) and drop evicted entries from it."""

    def __init__(self, cache):
        super().__init__()
        self.cache = cache
        self.locks: list[tuple[object, list[int], tuple[int, ...]]] = []

    @rule(tokens=tokens_st)
    def lock(self, tokens):
        slots, node = self.cache.match_prefix(tokens)
        self.cache.inc_lock_ref(node)
        self.locks.append((node, slots, tuple(tokens[: len(slots)])))

    @precondition(lambda self: self.locks)
    @rule(index=st.integers(0, 100))
    def unlock(self, index):
        node, _, _ = self.locks.pop(index % len(self.locks))
        self.cache.dec_lock_ref(node)

    @rule(num=st.integers(0, 12))
    def evict(self, num):
        evictable_before = self.cache.evictable_size()
        freed: list[int] = []
        reported = self.cache.evict(num, freed.extend)
        assert reported == len(freed)
        assert reported >= min(num, evictable_before)
        assert self.cache.evictable_size() == evictable_before - reported
        locked = {s for _, slots, _ in self.locks for s in slots}
        assert not locked & set(freed)
        self.forget(freed)

    def forget(self, freed: list[int]) -> None:
        raise NotImplementedError

    def locked_slots(self) -> set[int]:
        return {s for _, slots, _ in self.locks for s in slots}

    @invariant()
    def locked_paths_still_match(self):
        for _, slots, tokens in self.locks:
            assert self.cache.match_prefix(list(tokens))[0] == slots


class RadixCacheMachine(_LockingMachine):
    """The reference model: every cached prefix (as a tuple) -> the slot of its last token."""

    def __init__(self):
        super().__init__(RadixCache())
        self.ref: dict[tuple[int, ...], int] = {}
        self.next_slot = 1

    def _expected_match(self, tokens) -> list[int]:
        out = []
        for i in range(len(tokens)):
            slot = self.ref.get(tuple(tokens[: i + 1]))
            if slot is None:
                break
            out.append(slot)
        return out

    @rule(tokens=tokens_st)
    def insert(self, tokens):
        slots = list(range(self.next_slot, self.next_slot + len(tokens)))
        self.next_slot += len(tokens)
        expected_dup = len(self._expected_match(tokens))
        assert self.cache.insert(tokens, slots) == expected_dup
        for i in range(expected_dup, len(tokens)):
            self.ref[tuple(tokens[: i + 1])] = slots[i]

    @rule(tokens=tokens_st)
    def match(self, tokens):
        slots, _ = self.cache.match_prefix(tokens)
        assert slots == self._expected_match(tokens)

    def forget(self, freed):
        gone = set(freed)
        assert gone <= set(self.ref.values())
        self.ref = {k: v for k, v in self.ref.items() if v not in gone}

    @invariant()
    def slots_unique_and_sizes_consistent(self):
        slots = self.cache.all_slots()
        assert len(slots) == len(set(slots))
        assert set(slots) == set(self.ref.values())
        assert (
            self.cache.evictable_size() + self.cache.protected_size()
            == self.cache.total_size()
            == len(slots)
        )
        assert self.cache.protected_size() == len(self.locked_slots())

    @invariant()
    def reference_is_prefix_closed(self):
        for key in self.ref:
            assert len(key) == 1 or key[:-1] in self.ref


RadixCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestRadixCacheMachine = RadixCacheMachine.TestCase


PAGE = 2
pages_st = st.lists(
    st.lists(st.integers(0, 2), min_size=PAGE, max_size=PAGE), min_size=1, max_size=3
).map(lambda pages: [t for page in pages for t in page])


class PagedRadixCacheMachine(_LockingMachine):
    """The reference model: every cached whole-page prefix (as a tuple) -> the slots of its last page."""

    def __init__(self):
        super().__init__(PagedRadixCache(PAGE))
        self.ref: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.next_page = 1

    def _expected_match(self, tokens) -> list[int]:
        out: list[int] = []
        for end in range(PAGE, len(tokens) + 1, PAGE):
            page_slots = self.ref.get(tuple(tokens[:end]))
            if page_slots is None:
                break
            out += page_slots
        return out

    @rule(tokens=pages_st)
    def insert(self, tokens):
        slots = list(range(self.next_page * PAGE, (self.next_page + len(tokens) // PAGE) * PAGE))
        self.next_page += len(tokens) // PAGE
        expected_dup = len(self._expected_match(tokens))
        assert self.cache.insert(tokens, slots) == expected_dup
        for end in range(expected_dup + PAGE, len(tokens) + 1, PAGE):
            self.ref[tuple(tokens[:end])] = tuple(slots[end - PAGE : end])

    @rule(tokens=tokens_st)
    def match(self, tokens):
        slots, _ = self.cache.match_prefix(tokens)
        assert slots == self._expected_match(tokens)
        assert len(slots) % PAGE == 0

    def forget(self, freed):
        assert len(freed) % PAGE == 0
        gone = set(freed)
        self.ref = {k: v for k, v in self.ref.items() if not gone & set(v)}

    @invariant()
    def slots_are_whole_pages_and_sizes_consistent(self):
        slots = self.cache.all_slots()
        assert len(slots) == len(set(slots))
        assert set(slots) == {s for v in self.ref.values() for s in v}
        assert {s // PAGE for s in slots} == {v[0] // PAGE for v in self.ref.values()}
        assert self.cache.evictable_size() + self.cache.protected_size() == len(slots)
        assert self.cache.protected_size() == len(self.locked_slots())


PagedRadixCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestPagedRadixCacheMachine = PagedRadixCacheMachine.TestCase
