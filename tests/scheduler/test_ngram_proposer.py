"""N-gram lookup drafting: what it matches, the window bound, and that its incremental index proposes
what a brute-force search over the same history proposes."""

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


def test_rejects_bad_params():
    with pytest.raises(ValueError):
        NgramParams(min_match_window_size=3, max_match_window_size=2)
    with pytest.raises(ValueError):
        NgramParams(max_draft_tokens=0)
    with pytest.raises(ValueError):
        NgramParams(max_match_window_size=12, history_window=12)
