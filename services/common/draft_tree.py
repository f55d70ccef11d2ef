"""Tree drafts (speculative decoding), as the step contract carries them: a request's draft tokens
with a parent each (`draft_parents`): -1 for a child of the root (the token sampled last step), else
the index of an earlier draft token. Siblings carry distinct tokens, so the tokens a verify step
accepts name one path. A chain is parents [-1, 0, 1, ...], or no parents at all.

Plain functions over lists, shared by the scheduler (which drafts trees and keeps the accepted path's
KV slots) and the executor (which checks them and lays them out)."""

from __future__ import annotations

# Draft tokens in one request's tree, at most.
MAX_TREE_DRAFT_TOKENS = 64
# The executor keeps spare rows in its slot table, one per tree node of a step, for the node's own
# view of the sequence (its prefix and its ancestors): enough for every running request's tree,
# within this many bytes of table (a row holds a slot id per position of the context).
SPARE_TABLE_BYTES = 64 << 20


def spare_rows(max_requests: int, max_draft_tokens: int, context_length: int) -> int:
    """The slot table's spare rows for tree drafts (ExecutorModelInfo.max_tree_draft_tokens):
    every request's tree where SPARE_TABLE_BYTES allow, else fewer, but one whole tree at least."""
    fit = SPARE_TABLE_BYTES // (8 * max(1, context_length))
    return max(max_draft_tokens, min(max_requests * max_draft_tokens, fit))


def is_chain(parents: list[int]) -> bool:
    """Whether parents describe a chain (every draft follows the one before it)."""
    return all(p == i - 1 for i, p in enumerate(parents))


def tree_error(tokens: list[int], parents: list[int]) -> str | None:
    """Why (tokens, parents) is not a valid tree draft, None when it is."""
    if not parents:
        return None
    if len(parents) != len(tokens):
        return f"{len(parents)} draft_parents for {len(tokens)} draft_ids"
    children: set[tuple[int, int]] = set()
    for i, (token, parent) in enumerate(zip(tokens, parents)):
        if not -1 <= parent < i:
            return f"draft {i}'s parent {parent} is not -1 or an earlier draft's index"
        if (parent, token) in children:
            return f"draft {i} repeats a sibling's token {token}"
        children.add((parent, token))
    return None


def depths(parents: list[int]) -> list[int]:
    """Each draft's depth: 1 for a child of the root (it runs one position after the root)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def path_to(parents: list[int], node: int) -> list[int]:
    """The drafts from depth 1 down to node, node included."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def accepted_path(tokens: list[int], parents: list[int], accepted: list[int]) -> list[int]:
    """The indices of the drafts a verify step accepted, in depth order, from the tokens it accepted
    (accepted_draft_ids). ValueError if they are not a path of the tree."""
    if not parents:
        parents = list(range(-1, len(tokens) - 1))
    node, path = -1, []
    for token in accepted:
        child = next(
            (i for i, (t, p) in enumerate(zip(tokens, parents)) if p == node and t == token), None
        )
        if child is None:
            raise ValueError(f"accepted token {token} is no child of draft {node}")
        path.append(child)
        node = child
    return path


def first_chain(tokens: list[int], parents: list[int]) -> list[int]:
    """The tree's first chain: from the root, each node's first child (a draft head's proposals
    list a node's likeliest child first)."""
    node, chain = -1, []
    while True:
        child = next((i for i, p in enumerate(parents) if p == node), None)
        if child is None:
            return chain
        chain.append(tokens[child])
        node = child


def keep_path_first(slots: list[int], tokens: list[int], parents: list[int], accepted: list[int]):
    """Reorder the last len(tokens) entries of slots (the drafts' KV slots, in draft order) in place
    so the accepted path's come first, in depth order: the slots then follow the sequence's tokens,
    and the rejected ones are the tail a caller frees."""
    path = accepted_path(tokens, parents, accepted)
    base = len(slots) - len(tokens)
    drafted = slots[base:]
    on_path = set(path)
    slots[base:] = [drafted[i] for i in path] + [
        s for i, s in enumerate(drafted) if i not in on_path
    ]
