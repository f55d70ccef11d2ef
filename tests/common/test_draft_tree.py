"""common/draft_tree.py: the tree-draft helpers the scheduler and the executor share."""

from __future__ import annotations

import pytest

from radixserve.common.draft_tree import (
    accepted_path,
    depths,
    is_chain,
    keep_path_first,
    path_to,
    tree_error,
)

# root -> 5 (0) -> 6 (2) -> 8 (4)
#      -> 7 (1) -> 6 (3)
TOKENS = [5, 7, 6, 6, 8]
PARENTS = [-1, -1, 0, 1, 2]


def test_chains():
    assert is_chain([]) and is_chain([-1]) and is_chain([-1, 0, 1])
    assert not is_chain(PARENTS) and not is_chain([-1, -1])


def test_tree_errors():
    assert tree_error(TOKENS, PARENTS) is None
    assert tree_error([1, 2], []) is None  # a chain
    assert "parent 2" in tree_error([1, 2, 3], [-1, 2, 0])
    assert "parent -2" in tree_error([1], [-2])
    assert "repeats a sibling's token 7" in tree_error([7, 7], [-1, -1])
    assert "2 draft_parents for 3" in tree_error([1, 2, 3], [-1, 0])


def test_depths_and_paths():
    assert depths(PARENTS) == [1, 1, 2, 2, 3]
    assert path_to(PARENTS, 4) == [0, 2, 4] and path_to(PARENTS, 3) == [1, 3]


def test_accepted_path():
    assert accepted_path(TOKENS, PARENTS, [7, 6]) == [1, 3]
    assert accepted_path(TOKENS, PARENTS, [5, 6, 8]) == [0, 2, 4]
    assert accepted_path(TOKENS, PARENTS, []) == []
    assert accepted_path([4, 5], [], [4, 5]) == [0, 1]  # a chain without parents
    with pytest.raises(ValueError, match="no child of draft 1"):
        accepted_path(TOKENS, PARENTS, [7, 8])


def test_keep_path_first_moves_the_path_after_the_held_slots():
    slots = [100, 101, 50, 10, 11, 12, 13, 14]  # held, the root's slot 50, then the drafts'
    keep_path_first(slots, TOKENS, PARENTS, [7, 6])
    assert slots == [100, 101, 50, 11, 13, 10, 12, 14]
