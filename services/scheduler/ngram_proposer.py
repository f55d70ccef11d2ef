"""N-gram lookup drafting (speculative decoding without a draft model): the next tokens of a request
are guessed by finding an earlier occurrence of the end of its own prompt + output, and proposing what
followed it there.

The longest suffix of the history (between min_match_window_size and max_match_window_size tokens,
longest tried first) that also occurs earlier within the last history_window tokens is matched; the
most recent earlier occurrence wins. The draft copies the tokens after that occurrence; when the
copy reaches the end of the history it goes on over the draft itself (as an LZ77 copy does), so a
repeating pattern yields a full-length draft.

Per request, an index maps each n-gram (n in [min, max]) of the window to where its most recent
occurrence was followed. Appending a token indexes the n-grams ending before it (O(max) hashing, each
n-gram's hash chained from the next shorter one's); entries that left the window are ignored, and
the index is rebuilt from the window whenever it spans twice the window, so a token costs amortised
O(max_match_window_size) whatever the history's length, a proposal as much plus its length, and
memory stays under 2 x history_window x (max - min + 1) entries. A hit is checked against the tokens
themselves, so a hash collision only loses a draft.

Parameters are named after SGLang's --speculative-ngram-* flags where they mean the same. SGLang
drafts a tree from a cache shared by all requests (--speculative-ngram-{min,max}-bfs-breadth,
-branch-length, -capacity); this proposer drafts one chain from the request's own tokens, so those
have no counterpart here (a chain is a breadth of 1).
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


class NgramProposer:
    """One request's n-gram drafter: feed it every token of the sequence (prompt, then each accepted
    output token) with extend(), ask propose() for the next step's draft."""

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
        for follower in range(max(first, window_start + 1), self._length):
            for n, key in self._keys(follower, window_start):
                self._follower[n][key] = follower

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
