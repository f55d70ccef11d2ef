"""N-gram lookup drafting: what it matches, the window bound, and that its incremental index proposes
what a brute-force search over the same history proposes; the same for draft trees (several earlier
occurrences merged into a trie)."""

import random

import pytest

from radixserve.scheduler.ngram_proposer import NgramParams, NgramProposer


def brute_force(history: list[int], params: NgramParams, limit: int) -> list[int]:
    """The specification, searched naively: the longest suffix (min..max) with an earlier occurrence
    inside the window, its most recent one, and the tokens after it (copying past the end)."""
    length = len(history)
    window_start = max(0, length - params.history_window)
    for n in range(params.max_match_window_size, params.min_match_window_size - 1, -1):
        if n >= length:
            continue
        suffix = history[length - n :]
        for follower in range(length - 1, window_start + n - 1, -1):
            if history[follower - n : follower] == suffix:
                seq = list(history)
                for i in range(limit):
                    seq.append(seq[follower + i])
                return seq[length:]
    return []


def brute_force_tree(
    history: list[int], params: NgramParams, limit: int
) -> tuple[list[int], list[int]]:
    """The tree's specification, searched naively: for each suffix length, longest first, the
    max_bfs_breadth most recent occurrences inside the window (what the index keeps), skipping a
    position already taken and a continuation already drafted, until max_bfs_breadth candidates;
    then their prefixes, depth by depth and candidate by candidate, as nodes until limit of them."""
    limit = min(limit, params.max_draft_tokens)
    length = len(history)
    window_start = max(0, length - params.history_window)
    candidates: list[list[int]] = []
    used: set[int] = set()
    for n in range(params.max_match_window_size, params.min_match_window_size - 1, -1):
        if n >= length or len(candidates) == params.max_bfs_breadth:
            continue
        suffix = history[length - n :]
        occurrences = [
            follower
            for follower in range(length - 1, window_start + n - 1, -1)
            if history[follower - n : follower] == suffix
        ][: params.max_bfs_breadth]
        for follower in occurrences:
            if follower in used or len(candidates) == params.max_bfs_breadth:
                continue
            used.add(follower)
            seq = list(history)
            for i in range(limit):
                seq.append(seq[follower + i])
            if seq[length:] not in candidates:
                candidates.append(seq[length:])
    node_of: dict[tuple[int, ...], int] = {}  # a prefix of a candidate -> its node
    tokens: list[int] = []
    parents: list[int] = []
    for depth in range(limit):
        for candidate in candidates:
            prefix = tuple(candidate[: depth + 1])
            if prefix not in node_of and len(tokens) < limit:
                node_of[prefix] = len(tokens)
                tokens.append(prefix[-1])
                parents.append(node_of[prefix[:-1]] if depth else -1)
    return tokens, parents


def assert_well_formed(tokens: list[int], parents: list[int], limit: int) -> None:
    assert len(tokens) == len(parents) <= limit
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        assert -1 <= parent < i
        children.setdefault(parent, []).append(tokens[i])
    for siblings in children.values():
        assert len(siblings) == len(set(siblings))


def test_proposes_what_followed_the_earlier_occurrence():
    params = NgramParams(min_match_window_size=2, max_match_window_size=4, max_draft_tokens=3)
    proposer = NgramProposer(params, [5, 6, 7, 8, 9, 1, 2, 5, 6])
    assert proposer.propose() == [7, 8, 9]
    assert proposer.propose(max_tokens=2) == [7, 8]


def test_no_match_no_draft():
    proposer = NgramProposer(NgramParams(min_match_window_size=2), [1, 2, 3, 4, 5, 6])
    assert proposer.propose() == []
    assert NgramProposer(NgramParams(), []).propose() == []
    assert NgramProposer(NgramParams(), [7]).propose() == []


def test_prefers_the_longest_match_over_the_most_recent_shorter_one():
    params = NgramParams(min_match_window_size=1, max_match_window_size=3, max_draft_tokens=2)
    # "1 2 3" occurred once (followed by 40 41); "3" alone more recently (followed by 50 51).
    history = [1, 2, 3, 40, 41, 9, 3, 50, 51, 8, 1, 2, 3]
    assert NgramProposer(params, history).propose() == [40, 41]
    # With matches of length 1 only, the most recent occurrence of "3" wins.
    only_one = NgramParams(min_match_window_size=1, max_match_window_size=1, max_draft_tokens=2)
    assert NgramProposer(only_one, history).propose() == [50, 51]


def test_repetition_copies_past_the_end_of_the_history():
    params = NgramParams(min_match_window_size=1, max_match_window_size=4, max_draft_tokens=7)
    assert NgramProposer(params, [9, 1, 2, 3, 1, 2, 3]).propose() == [1, 2, 3, 1, 2, 3, 1]
    assert NgramProposer(params, [4, 4]).propose() == [4] * 7


def test_matches_outside_the_window_are_forgotten():
    params = NgramParams(
        min_match_window_size=2, max_match_window_size=3, max_draft_tokens=2, history_window=8
    )
    proposer = NgramProposer(params, [1, 2, 77, 78])
    proposer.extend([10, 11, 12])
    proposer.extend([1, 2])  # the window is the last 8 tokens: [2, 77, 78, 10, 11, 12, 1, 2]
    assert proposer.propose() == []
    inside = NgramProposer(params, [1, 2, 77, 78, 10, 11, 1, 2])
    assert inside.propose() == [77, 78]
    # In one extend, an occurrence straddling the window's start (the window begins at its "2").
    straddling = [7, 7, 1, 2, 5, 8, 8, 8, 8, 1, 2]
    assert NgramProposer(params, straddling).propose() == []
    incremental = NgramProposer(params)
    for token in straddling:
        incremental.extend([token])
    assert incremental.propose() == []


def test_memory_is_bounded_by_the_window():
    params = NgramParams(max_match_window_size=4, history_window=64)
    proposer = NgramProposer(params)
    rng = random.Random(0)
    for _ in range(5000):
        proposer.extend([rng.randrange(50)])
    assert len(proposer) == 5000
    assert len(proposer._tokens) <= 2 * params.history_window + 1
    sizes = range(params.min_match_window_size, params.max_match_window_size + 1)
    assert sum(len(proposer._follower[n]) for n in sizes) <= 2 * params.history_window * len(sizes)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_equals_rebuild_equals_brute_force(seed):
    rng = random.Random(seed)
    params = NgramParams(
        min_match_window_size=rng.choice([1, 2]),
        max_match_window_size=rng.choice([3, 5]),
        max_draft_tokens=rng.choice([1, 4, 6]),
        history_window=rng.choice([8, 16, 40]),
    )
    vocab = rng.choice([3, 6])
    incremental = NgramProposer(params)
    history: list[int] = []
    while len(history) < 300:
        chunk = [rng.randrange(vocab) for _ in range(rng.choice([1, 1, 1, 3, 20, 70]))]
        history += chunk
        incremental.extend(chunk)
        limit = rng.randrange(1, params.max_draft_tokens + 1)
        expected = brute_force(history, params, limit)
        assert incremental.propose(limit) == expected
        assert NgramProposer(params, history).propose(limit) == expected
    assert any(brute_force(history[:i], params, 1) for i in range(len(history)))


def test_tree_of_breadth_one_is_the_chain():
    histories = [
        [5, 6, 7, 8, 9, 1, 2, 5, 6],
        [1, 2, 3, 40, 41, 9, 3, 50, 51, 8, 1, 2, 3],
        [9, 1, 2, 3, 1, 2, 3],  # a repeating pattern: the copy runs past the history's end
        [4, 4],
        [1, 2, 3, 4, 5, 6],  # no match
        [7],
        [],
    ]
    params = NgramParams(max_match_window_size=4, max_draft_tokens=7)
    for history in histories:
        proposer = NgramProposer(params, history)
        for limit in (None, 0, 1, 3, 7, 20):
            chain = proposer.propose(limit)
            assert proposer.propose_tree(limit) == (chain, list(range(-1, len(chain) - 1)))
    assert NgramProposer(params, [9, 1, 2, 3, 1, 2, 3]).propose_tree() == (
        [1, 2, 3, 1, 2, 3, 1],
        [-1, 0, 1, 2, 3, 4, 5],
    )
    assert NgramProposer(params, [1, 2, 3, 4, 5, 6]).propose_tree() == ([], [])


def test_tree_branches_on_each_earlier_occurrence():
    params = NgramParams(
        min_match_window_size=1, max_match_window_size=3, max_draft_tokens=6, max_bfs_breadth=2
    )
    # "1 2" occurred twice: followed by 10 11 5, then (more recently) by 20 21 6.
    proposer = NgramProposer(params, [1, 2, 10, 11, 5, 1, 2, 20, 21, 6, 1, 2])
    assert proposer.propose(4) == [20, 21, 6, 1]
    # Breadth first: both branches' first tokens, then their second ones; the recent one first.
    assert proposer.propose_tree(4) == ([20, 10, 21, 11], [-1, -1, 0, 1])
    assert proposer.propose_tree() == ([20, 10, 21, 11, 6, 5], [-1, -1, 0, 1, 2, 3])
    assert proposer.propose_tree(1) == ([20], [-1])
    # A longer suffix's occurrence comes before a shorter one's, however recent: "1 2 3" was
    # followed by 40 41, "3" alone more recently by 50 51 (its occurrence inside "1 2 3" is the
    # same position as the first branch's, so it is not taken twice).
    history = [1, 2, 3, 40, 41, 9, 3, 50, 51, 8, 1, 2, 3]
    narrow = NgramParams(max_match_window_size=3, max_draft_tokens=2, max_bfs_breadth=3)
    assert NgramProposer(narrow, history).propose_tree() == ([40, 50], [-1, -1])
    wide = NgramParams(max_match_window_size=3, max_draft_tokens=4, max_bfs_breadth=3)
    assert NgramProposer(wide, history).propose_tree() == ([40, 50, 41, 51], [-1, -1, 0, 1])


def test_tree_merges_shared_prefixes():
    params = NgramParams(max_match_window_size=3, max_draft_tokens=5, max_bfs_breadth=2)
    # "1 2" was followed by 7 10 5, then by 7 20 6: one node for 7, then the two branches.
    proposer = NgramProposer(params, [1, 2, 7, 10, 5, 1, 2, 7, 20, 6, 1, 2])
    assert proposer.propose_tree() == ([7, 20, 10, 6, 5], [-1, 0, 0, 1, 2])
    assert proposer.propose_tree(2) == ([7, 20], [-1, 0])


def test_tree_skips_a_continuation_drafted_already():
    params = NgramParams(
        min_match_window_size=1, max_match_window_size=1, max_draft_tokens=4, max_bfs_breadth=3
    )
    # "7" was followed by 30 31, then twice by 20 21: the repeat takes no branch, 30 31 does.
    proposer = NgramProposer(params, [7, 30, 31, 7, 20, 21, 7, 20, 21, 7])
    assert proposer.propose_tree() == ([20, 30, 21, 31], [-1, -1, 0, 1])


def test_tree_occurrences_outside_the_window_are_forgotten():
    params = NgramParams(
        min_match_window_size=2,
        max_match_window_size=3,
        max_draft_tokens=6,
        history_window=10,
        max_bfs_breadth=3,
    )
    # "1 2" occurred three times; the window (last 10 tokens) starts at the second occurrence.
    history = [1, 2, 50, 51, 1, 2, 60, 61, 1, 2, 70, 71, 1, 2]
    expected = ([70, 60, 71, 61, 1, 1], [-1, -1, 0, 1, 2, 3])
    assert NgramProposer(params, history).propose_tree() == expected
    incremental = NgramProposer(params)
    for token in history:
        incremental.extend([token])
    assert incremental.propose_tree() == expected
    unbounded = NgramProposer(
        NgramParams(
            min_match_window_size=2, max_match_window_size=3, max_draft_tokens=3, max_bfs_breadth=3
        ),
        history,
    )
    assert unbounded.propose_tree() == ([70, 60, 50], [-1, -1, -1])


def test_tree_index_memory_is_bounded_by_the_window():
    params = NgramParams(max_match_window_size=4, history_window=64, max_bfs_breadth=3)
    proposer = NgramProposer(params)
    rng = random.Random(0)
    for _ in range(5000):
        proposer.extend([rng.randrange(50)])
    sizes = range(params.min_match_window_size, params.max_match_window_size + 1)
    positions = sum(len(proposer._follower[n]) for n in sizes) + sum(
        len(older) for n in sizes for older in proposer._older[n].values()
    )
    assert positions <= 2 * params.history_window * len(sizes)
    assert all(
        len(older) < params.max_bfs_breadth for n in sizes for older in proposer._older[n].values()
    )
    assert not any(NgramProposer(NgramParams(), [1, 2, 1, 2, 1])._older.values())


@pytest.mark.parametrize("seed", range(4))
def test_tree_is_well_formed_and_equals_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(40):
        params = NgramParams(
            min_match_window_size=rng.choice([1, 2]),
            max_match_window_size=rng.choice([2, 4]),
            max_draft_tokens=rng.choice([1, 4, 10]),
            history_window=rng.choice([8, 16, 64]),
            max_bfs_breadth=rng.randint(1, 4),
        )
        vocab = rng.choice([2, 3, 5])
        incremental = NgramProposer(params)
        history: list[int] = []
        while len(history) < 60:
            chunk = [rng.randrange(vocab) for _ in range(rng.choice([1, 1, 2, 9]))]
            history += chunk
            incremental.extend(chunk)
            limit = rng.randint(1, 10)
            tokens, parents = incremental.propose_tree(limit)
            assert_well_formed(tokens, parents, min(limit, params.max_draft_tokens))
            assert (tokens, parents) == brute_force_tree(history, params, limit)
            assert NgramProposer(params, history).propose_tree(limit) == (tokens, parents)
            # The first branch is propose()'s chain, as deep as the budget let every branch grow.
            chain = incremental.propose(limit)
            assert bool(tokens) == bool(chain)
            node, depth = -1, 0
            for i, (token, parent) in enumerate(zip(tokens, parents)):
                if depth < len(chain) and parent == node and token == chain[depth]:
                    node, depth = i, depth + 1
            assert depth >= len(tokens) // params.max_bfs_breadth
            assert parents.count(-1) <= params.max_bfs_breadth
            if params.max_bfs_breadth == 1:
                assert (tokens, parents) == (chain, list(range(-1, len(chain) - 1)))


def test_rejects_bad_params():
    with pytest.raises(ValueError):
        NgramParams(min_match_window_size=3, max_match_window_size=2)
    with pytest.raises(ValueError):
        NgramParams(max_draft_tokens=0)
    with pytest.raises(ValueError):
        NgramParams(max_match_window_size=12, history_window=12)
    with pytest.raises(ValueError, match="max_bfs_breadth"):
        NgramParams(max_bfs_breadth=0)
