"""N-gram lookup drafting (speculative decoding without a draft model): the next tokens of a request
are guessed by finding an earlier occurrence of the end of its own prompt + output, and proposing what
followed it there.

The longest suffix of the history (between min_match_window_size and max_match_window_size tokens,
longest tried first) that also occurs earlier within the last history_window tokens is matched; the
most recent earlier occurrence wins. The draft copies the tokens after that occurrence; when the
copy reaches the end of the history it goes on over the draft itself (as an LZ77 copy does), so a
repeating pattern yields a full-length draft.

propose_tree() drafts several continuations at once, as a tree that one verify step checks: up to
max_bfs_breadth distinct ones, taken from the earlier occurrences in the same order (longest suffix
first, then most recent first), merged into a trie breadth-first so that a shared prefix costs one
node and the node budget goes to the first tokens of each branch before the later ones. The first
branch is propose()'s chain; with a breadth of 1 the tree is that chain.

Per request, an index maps each n-gram (n in [min, max]) of the window to where its max_bfs_breadth
most recent occurrences were followed. Appending a token indexes the n-grams ending before it (O(max)
hashing, each n-gram's hash chained from the next shorter one's, and O(breadth) to shift the older
followers); entries that left the window are ignored, and the index is rebuilt from the window
whenever it spans twice the window, so a token costs amortised O(max_match_window_size x breadth)
whatever the history's length, a proposal as much plus its length, and memory stays under
2 x history_window x (max - min + 1) stored positions whatever the breadth (each is one indexed
occurrence; a breadth above 1 only keeps some that a breadth of 1 overwrites). A hit is checked
against the tokens themselves, so a hash collision only loses a draft.

Parameters are named after SGLang's --speculative-ngram-* flags where they mean the same. SGLang
drafts a tree from a cache shared by all requests; max_bfs_breadth is the counterpart of its
--speculative-ngram-max-bfs-breadth, but the branches come from the request's own tokens, not from
that shared cache. Its other tree flags (--speculative-ngram-min-bfs-breadth, -branch-length,
-capacity) shape or size the shared cache, so they have no counterpart here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class NgramParams:
    """Defaults: SGLang's match window sizes (1 and 12); 8 draft tokens, because at small batches a
    verify step reads the weights once whatever its width, so a long draft costs little when wrong
    and saves many steps on copy-heavy output (code edits, quoting); a 2048-token window covers a
    typical prompt plus its answer at a bounded cost per request (under 50k index entries, about
    3 MB, and tens of microseconds of CPU per token)."""

    min_match_window_size: int = 1  # --speculative-ngram-min-match-window-size
    max_match_window_size: int = 12  # --speculative-ngram-max-match-window-size
    # Draft tokens per verify step; SGLang's --speculative-num-draft-tokens counts the last verified
    # token too, so it is this + 1.
    max_draft_tokens: int = 8
    history_window: int = 2048  # matches are searched in this many most recent tokens
    # --speculative-ngram-max-bfs-breadth: distinct continuations drafted as a tree (1: a chain)
    max_bfs_breadth: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_match_window_size <= self.max_match_window_size:
            raise ValueError(
                "need 1 <= min_match_window_size <= max_match_window_size, got "
                f"{self.min_match_window_size} and {self.max_match_window_size}"
            )
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}")
        if self.history_window <= self.max_match_window_size:
            raise ValueError(
                f"history_window ({self.history_window}) must exceed max_match_window_size "
                f"({self.max_match_window_size})"
            )
        if self.max_bfs_breadth < 1:
            raise ValueError(f"max_bfs_breadth must be >= 1, got {self.max_bfs_breadth}")


class NgramProposer:
    """One request's n-gram drafter: feed it every token of the sequence (prompt, then each accepted
    output token) with extend(), ask propose() for the next step's draft (a chain) or propose_tree()
    for a tree of them."""

    def __init__(self, params: NgramParams = NgramParams(), tokens: Iterable[int] = ()):
        self.params = params
        self._sizes = range(params.min_match_window_size, params.max_match_window_size + 1)
        # _tokens[i] is the sequence's token at position _offset + i (_offset: where the index was
        # last rebuilt): the window and up to history_window older tokens.
        self._tokens: list[int] = []
        self._offset = 0
        self._length = 0
        # _follower[n][hash of an n-gram] = the position right after its most recent occurrence.
        self._follower: dict[int, dict[int, int]] = {n: {} for n in self._sizes}
        # _older[n][hash] = the positions after its next max_bfs_breadth - 1 most recent occurrences,
        # most recent first. Kept apart from _follower so that a breadth of 1 (the default) stores
        # and costs exactly what a chain needs: an int per n-gram, no list.
        self._older: dict[int, dict[int, list[int]]] = {n: {} for n in self._sizes}
        self.extend(tokens)

    def __len__(self) -> int:
        """The sequence's length so far (tokens before the window included)."""
        return self._length

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens to the sequence. Tokens already out of the window by the end of the call are
        never indexed, so a long prompt costs only its last history_window tokens."""
        new = list(tokens)
        if not new:
            return
        first = self._length
        self._tokens.extend(new)
        self._length += len(new)
        window_start = self._window_start()
        if window_start - self._offset > self.params.history_window:
            # Index and tokens cover over twice the window: start both again from the window.
            del self._tokens[: window_start - self._offset]
            self._offset = first = window_start
            self._follower = {n: {} for n in self._sizes}
            self._older = {n: {} for n in self._sizes}
        keep_older = self.params.max_bfs_breadth - 1
        for follower in range(max(first, window_start + 1), self._length):
            for n, key in self._keys(follower, window_start):
                latest = self._follower[n]
                previous = latest.get(key)
                latest[key] = follower
                if keep_older and previous is not None:
                    older = self._older[n].get(key)
                    if older is None:
                        self._older[n][key] = [previous]
                    else:
                        older.insert(0, previous)
                        del older[keep_older:]

    def propose(self, max_tokens: int | None = None) -> list[int]:
        """The draft for the tokens after the sequence: up to min(max_tokens, max_draft_tokens) of
        them, none when no suffix of at least min_match_window_size tokens occurred before."""
        limit = self.params.max_draft_tokens if max_tokens is None else max_tokens
        limit = min(limit, self.params.max_draft_tokens)
        if limit <= 0:
            return []
        window_start = self._window_start()
        for n, key in reversed(list(self._keys(self._length, window_start))):
            follower = self._follower[n].get(key)
            if follower is None or follower - n < window_start:
                continue  # never seen, or last seen before the window (not yet forgotten)
            if self._same(follower - n, self._length - n, n):
                return self._copy(follower, limit)
        return []

    def propose_tree(self, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """A draft tree of up to min(max_tokens, max_draft_tokens) nodes, as (tokens, parents):
        parents[i] is -1 for a child of the root (the sequence's last token, which the draft
        follows), else the index of an earlier node; siblings carry distinct tokens. The branches are
        the continuations after up to max_bfs_breadth earlier occurrences (see _candidates), merged
        into a trie breadth-first: depth by depth, each candidate in turn adds its token under its
        prefix's node unless that node already has it, until the budget is spent. So a shorter
        budget keeps the first tokens of every branch rather than all of the first branch, and with a
        breadth of 1 the tree is propose()'s chain. ([], []) when nothing matched."""
        limit = self.params.max_draft_tokens if max_tokens is None else max_tokens
        limit = min(limit, self.params.max_draft_tokens)
        tokens: list[int] = []
        parents: list[int] = []
        if limit <= 0:
            return tokens, parents
        candidates = self._candidates(limit)
        node_of: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        at = [-1] * len(candidates)  # each candidate's node at the previous depth (-1: the root)
        for depth in range(limit):
            for c, candidate in enumerate(candidates):
                edge = (at[c], candidate[depth])
                node = node_of.get(edge)
                if node is None:
                    node = node_of[edge] = len(tokens)
                    tokens.append(candidate[depth])
                    parents.append(at[c])
                    if len(tokens) == limit:
                        return tokens, parents
                at[c] = node
        return tokens, parents

    def _candidates(self, limit: int) -> list[list[int]]:
        """Up to max_bfs_breadth distinct continuations of limit tokens, in propose()'s order of
        preference: longer suffixes first, then more recent occurrences. The same position found
        again through a shorter suffix is skipped, and so is a continuation equal to an earlier one
        (a repeated passage followed alike both times): it would add no node to the tree, while a
        later, different one does."""
        breadth = self.params.max_bfs_breadth
        window_start = self._window_start()
        used: set[int] = set()
        seen: set[tuple[int, ...]] = set()
        candidates: list[list[int]] = []
        for n, key in reversed(list(self._keys(self._length, window_start))):
            for follower in self._followers(n, key):
                if follower - n < window_start:
                    break  # this one and the older ones were seen before the window
                if follower in used or not self._same(follower - n, self._length - n, n):
                    continue
                used.add(follower)
                continuation = self._copy(follower, limit)
                if tuple(continuation) in seen:
                    continue
                seen.add(tuple(continuation))
                candidates.append(continuation)
                if len(candidates) == breadth:
                    return candidates
        return candidates

    def _followers(self, n: int, key: int) -> Iterator[int]:
        """The positions after the indexed occurrences of the n-gram with hash key, most recent
        first (positions only grow, so older ones lie further back)."""
        latest = self._follower[n].get(key)
        if latest is None:
            return
        yield latest
        yield from self._older[n].get(key, ())

    def _window_start(self) -> int:
        return max(0, self._length - self.params.history_window)

    def _keys(self, end: int, lowest: int) -> Iterator[tuple[int, int]]:
        """(n, hash) of the n-grams ending right before position end and starting at or after
        lowest, shortest first; each hash chains the previous one with one more token."""
        key = 0
        for n in range(1, self.params.max_match_window_size + 1):
            start = end - n
            if start < lowest:
                return
            key = hash((key, self._tokens[start - self._offset]))
            if n >= self.params.min_match_window_size:
                yield n, key

    def _copy(self, source: int, count: int) -> list[int]:
        """count tokens from position source on, reading past the end into the copy itself."""
        out: list[int] = []
        for i in range(count):
            position = source + i
            if position < self._length:
                out.append(self._tokens[position - self._offset])
            else:
                out.append(out[position - self._length])
        return out

    def _same(self, a: int, b: int, n: int) -> bool:
        tokens, offset = self._tokens, self._offset
        return tokens[a - offset : a - offset + n] == tokens[b - offset : b - offset + n]
