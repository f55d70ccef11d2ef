"""An approximate radix tree of token-id sequences, for cache-aware routing (dp_router.py): the prompts the
gateway sent to one data-parallel replica, i.e. roughly what that replica's radix cache holds.

Edges hold runs of token ids; a node's children are keyed by the first id of their edge. The tree is
bounded: once it holds more than max_tokens ids, the least recently used leaves are dropped until it
holds at most EVICT_TO of that (so a full tree does not scan its leaves on every insert).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

EVICT_TO = 0.9


class _Node:
    __slots__ = ("key", "children", "parent", "last_used")

    def __init__(self, key: tuple[int, ...], parent: "_Node | None", last_used: int):
        self.key = key  # the token ids on the edge from the parent
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.last_used = last_used


def _common_length(key: tuple[int, ...], ids: tuple[int, ...], start: int) -> int:
    """How many leading ids of key equal ids[start:]."""
    n = min(len(key), len(ids) - start)
    if key[:n] == ids[start : start + n]:
        return n
    return next(j for j in range(n) if key[j] != ids[start + j])


class PrefixTree:
    def __init__(self, max_tokens: int):
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.max_tokens = max_tokens
        self.size = 0  # token ids held (the sum of the edges' lengths)
        self._root = _Node((), None, 0)
        self._clock = itertools.count(1)

    def match(self, ids: Sequence[int]) -> int:
        """The length of the longest prefix of ids the tree holds."""
        ids = tuple(ids)
        node, i = self._root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                break
            n = _common_length(child.key, ids, i)
            i += n
            if n < len(child.key):
                break
            node = child
        return i

    def insert(self, ids: Sequence[int]) -> None:
        """Add ids (at most max_tokens of them) and mark their path as just used; evict if past the bound."""
        ids = tuple(ids[: self.max_tokens])
        now = next(self._clock)
        node, i = self._root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                node.children[ids[i]] = _Node(ids[i:], node, now)
                self.size += len(ids) - i
                break
            n = _common_length(child.key, ids, i)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_used = now
            node, i = child, i + n
        if self.size > self.max_tokens:
            self._evict(int(self.max_tokens * EVICT_TO))

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut child's edge after n ids; returns the new node that holds the first n."""
        upper = _Node(child.key[:n], child.parent, child.last_used)
        child.parent.children[child.key[0]] = upper
        child.key, child.parent = child.key[n:], upper
        upper.children[child.key[0]] = child
        return upper

    def _leaves(self) -> list[_Node]:
        leaves, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append(node)
        return leaves

    def _evict(self, target: int) -> None:
        """Drop least recently used leaves (a parent left childless becomes one) until size <= target."""
        heap = [(leaf.last_used, id(leaf), leaf) for leaf in self._leaves()]
        heapq.heapify(heap)
        while self.size > target and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            self.size -= len(leaf.key)
            if parent is not self._root and not parent.children:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
