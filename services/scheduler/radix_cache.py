"""Radix tree prefix cache over token ids and KV slot ids.

Each edge holds a run of tokens and the KV slots that hold their keys/values. A request locks the
path to the node its cached prefix ends at, so that path cannot be evicted while it runs.
Eviction frees unlocked leaves, least recently used first. Pure Python, no I/O.

Namespaces keep KV of different LoRA adapters apart: the same tokens under two adapters have different
keys and values. Each namespace but the base model's ("") has its own root, a node with an empty edge
hanging off the tree's root under the key ("lora", name) (no token key is such a tuple), holding one
lock of its own so that eviction never removes it (drop_namespace does, once it is empty).

PagedRadixCache works in whole pages (as SGLang's paged radix cache): edges are page multiples,
children are keyed by their first page, matches are rounded down to a page multiple, and only
page multiples can be inserted, so every node holds whole KV pages and eviction frees whole pages.
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

FreeFn = Callable[[list[int]], None]


class TreeNode:
    __slots__ = ("key", "slots", "children", "parent", "lock_ref", "last_access", "uid")

    def __init__(self, key: list[int], slots: list[int], parent: TreeNode | None, uid: int):
        self.key = key
        self.slots = slots
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0
        self.uid = uid

    def __repr__(self) -> str:
        return f"TreeNode(key={self.key}, slots={self.slots}, lock_ref={self.lock_ref})"


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    page_size = 1

    def __init__(self) -> None:
        self.reset()

    @staticmethod
    def _child_key(key: Sequence[int], i: int):
        """The key under which the child edge starting at key[i] hangs."""
        return key[i]

    @staticmethod
    def _match_len(a: Sequence[int], b: Sequence[int]) -> int:
        return _common_prefix_len(a, b)

    def reset(self) -> None:
        """Forget everything (the caller owns freeing the slots)."""
        self._clock = 0
        self._next_uid = 0
        self.root = self._new_node([], [], None)
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable = 0
        self._protected = 0

    def _new_node(self, key: list[int], slots: list[int], parent: TreeNode | None) -> TreeNode:
        node = TreeNode(key, slots, parent, self._next_uid)
        self._next_uid += 1
        return node

    def _touch(self, node: TreeNode) -> None:
        self._clock += 1
        node.last_access = self._clock

    def _namespace_root(self, namespace: str, create: bool) -> TreeNode | None:
        """The root of a namespace's tokens (the tree's root for ""); None if absent and not create."""
        if not namespace:
            return self.root
        key = ("lora", namespace)
        node = self.root.children.get(key)
        if node is None and create:
            node = self._new_node([], [], self.root)
            node.lock_ref = 1  # never a leaf eviction picks
            self.root.children[key] = node
        return node

    def drop_namespace(self, namespace: str, free_fn: FreeFn | None = None) -> bool:
        """Forget a namespace (its adapter is gone): with free_fn, free the slots of all its tokens
        first. False (nothing changed) while a request locks part of it, or, without free_fn, while
        it holds tokens."""
        root = self._namespace_root(namespace, create=False) if namespace else None
        if root is None or root.lock_ref > 1 or (root.children and free_fn is None):
            return False
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            free_fn(list(node.slots))
            self._evictable -= len(node.key)
            stack.extend(node.children.values())
        del self.root.children[("lora", namespace)]
        return True

    def match_prefix(
        self, tokens: Sequence[int], namespace: str = ""
    ) -> tuple[list[int], TreeNode]:
        """Slots of the longest cached prefix of tokens (in namespace), and the node it ends at."""
        node = self._namespace_root(namespace, create=True)
        slots: list[int] = []
        i = 0
        end = len(tokens) - len(tokens) % self.page_size
        while i < end:
            child = node.children.get(self._child_key(tokens, i))
            if child is None:
                break
            n = self._match_len(child.key, tokens[i : min(i + len(child.key), end)])
            if n < len(child.key):
                child = self._split(child, n)
            self._touch(child)
            slots += child.slots
            node = child
            i += n
        return slots, node

    def insert(self, tokens: Sequence[int], slots: Sequence[int], namespace: str = "") -> int:
        """Cache tokens with their slots (in namespace); return how many leading tokens were cached
        already.

        The cache keeps the slots it already had for those leading tokens, so the caller's own
        slots at those positions are duplicates it must free (unless they are the very slots it
        matched earlier).
        """
        if len(tokens) != len(slots):
            raise ValueError(f"{len(tokens)} tokens but {len(slots)} slots")
        if len(tokens) % self.page_size:
            raise ValueError(
                f"{len(tokens)} tokens are not a whole number of pages of {self.page_size}"
            )
        node = self._namespace_root(namespace, create=True)
        i = 0
        while i < len(tokens):
            key = self._child_key(tokens, i)
            child = node.children.get(key)
            if child is None:
                leaf = self._new_node(list(tokens[i:]), list(slots[i:]), node)
                node.children[key] = leaf
                self._evictable += len(leaf.key)
                self._touch(leaf)
                return i
            n = self._match_len(child.key, tokens[i : i + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            self._touch(child)
            node = child
            i += n
        return i

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child's edge after n tokens; return the new upper node (child keeps the rest)."""
        parent = child.parent
        upper = self._new_node(child.key[:n], child.slots[:n], parent)
        # Every lock on child goes through upper too, so upper inherits the count.
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children[self._child_key(child.key, n)] = child
        parent.children[self._child_key(child.key, 0)] = upper
        child.parent = upper
        child.key = child.key[n:]
        child.slots = child.slots[n:]
        return upper

    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"unlocking an unlocked node {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent

    def evict(self, num_tokens: int, free_fn: FreeFn) -> int:
        """Free at least num_tokens slots (when possible) from unlocked leaves, LRU first.

        Returns the number of slots freed, which can exceed num_tokens by part of a leaf.
        """
        heap = [(n.last_access, n.uid, n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            free_fn(list(leaf.slots))
            freed += len(leaf.slots)
            self._evictable -= len(leaf.key)
            parent = leaf.parent
            del parent.children[self._child_key(leaf.key, 0)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.uid, parent))
        return freed

    def _leaves(self) -> list[TreeNode]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                leaves.append(node)
        return leaves

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def all_slots(self) -> list[int]:
        """Every slot the tree holds (for leak checks and tests)."""
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out += node.slots
            stack.extend(node.children.values())
        return out


class PagedRadixCache(RadixCache):
    def __init__(self, page_size: int) -> None:
        if page_size < 2:
            raise ValueError(f"use RadixCache for page size {page_size}")
        self.page_size = page_size
        super().__init__()

    def _child_key(self, key: Sequence[int], i: int):
        return tuple(key[i : i + self.page_size])

    def _match_len(self, a: Sequence[int], b: Sequence[int]) -> int:
        n = _common_prefix_len(a, b)
        return n - n % self.page_size


def make_radix_cache(page_size: int = 1, disable: bool = False):
    if disable:
        return DisabledRadixCache()
    return RadixCache() if page_size == 1 else PagedRadixCache(page_size)


class DisabledRadixCache:
    """Same interface, caches nothing: every match is empty, every insert hands all slots back."""

    def __init__(self) -> None:
        self.root = TreeNode([], [], None, 0)

    def reset(self) -> None:
        pass

    def match_prefix(
        self, tokens: Sequence[int], namespace: str = ""
    ) -> tuple[list[int], TreeNode]:
        return [], self.root

    def drop_namespace(self, namespace: str, free_fn: FreeFn | None = None) -> bool:
        return True

    def insert(self, tokens: Sequence[int], slots: Sequence[int], namespace: str = "") -> int:
        # Report every token as already cached, so the caller frees all of its slots.
        return len(tokens)

    def inc_lock_ref(self, node: TreeNode) -> None:
        pass

    def dec_lock_ref(self, node: TreeNode) -> None:
        pass

    def evict(self, num_tokens: int, free_fn: FreeFn) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def all_slots(self) -> list[int]:
        return []
