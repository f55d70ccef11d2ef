"""N-gram lookup drafting (speculative decoding without a draft model): the next tokens of a request
are guessed by finding an earlier occurrence of the end of its own prompt + output, and proposing what
followed it there.

The longest suffix of the history (between min_match_window_size and max_match_window_size tokens,
longest tried first) that also occurs earlier within the last history_window tokens is matched; the
most recent earlier occurrence wins. The draft copies the tokens after that occurrence; when the
copy reaches the end of the history it goes on over the draft itself (as an LZ77 copy does), so a
repeating pattern yields a full-length draft.

Per request, an index maps each n-gram (n in [min, max]) of the window to where its most recent
occurrence was followed; appending a token updates it and forgets what left the window, so a token
costs O(max_match_window_size^2) whatever the history's length, a proposal as much plus its length,
and memory is O(history_window x (max - min + 1)) entries. Keys are the n-grams' hashes; a hit is
checked against the tokens themselves, so a hash collision only loses a draft.

Parameters are named after SGLang's --speculative-ngram-* flags where they mean the same. SGLang
drafts a tree from a cache shared by all requests (--speculative-ngram-{min,max}-bfs-breadth,
-branch-length, -capacity); this proposer drafts one chain from the request's own tokens, so those
have no counterpart here (a chain is a breadth of 1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class NgramParams:
    """Defaults: SGLang's match window sizes (1 and 12); 8 draft tokens, because at small batches a
    verify step reads the weights once whatever its width, so a long draft costs little when wrong
    and saves many steps on copy-heavy output (code edits, quoting); a 2048-token window covers a
    typical prompt plus its answer at a bounded cost per request (about 25k index entries)."""

    min_match_window_size: int = 1  # --speculative-ngram-min-match-window-size
    max_match_window_size: int = 12  # --speculative-ngram-max-match-window-size
    max_draft_tokens: int = 8  # the chain length verified per step (--speculative-num-draft-tokens)
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
        # _tokens[i] is the sequence's token at position _offset + i: the window and, between trims,
        # up to history_window older tokens.
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
        """Append tokens to the sequence. Tokens that are already out of the window by the end of
        the call are never indexed, so a long prompt costs only its last history_window tokens."""
        new = list(tokens)
        if not new:
            return
        old_length = self._length
        self._length += len(new)
        self._tokens.extend(new)
        old_start = max(0, old_length - self.params.history_window)
        new_start = max(0, self._length - self.params.history_window)
        # Forget the n-grams that start before the new window (only those indexed: before old_length).
        for start in range(old_start, min(new_start, old_length)):
            for n in self._sizes:
                follower = start + n
                if follower >= old_length:
                    break
                key = self._hash(start, follower)
                if self._follower[n].get(key) == follower:
                    del self._follower[n][key]
        # Index each new position as the follower of the n-grams ending right before it.
        for follower in range(max(old_length, new_start + 1), self._length):
            for n in self._sizes:
                if follower - n < new_start:
                    break
                self._follower[n][self._hash(follower - n, follower)] = follower
        if new_start - self._offset > self.params.history_window:
            del self._tokens[: new_start - self._offset]
            self._offset = new_start

    def propose(self, max_tokens: int | None = None) -> list[int]:
        """The draft for the tokens after the sequence: up to min(max_tokens, max_draft_tokens) of
        them, none when no suffix of at least min_match_window_size tokens occurred before."""
        limit = self.params.max_draft_tokens if max_tokens is None else max_tokens
        limit = min(limit, self.params.max_draft_tokens)
        if limit <= 0:
            return []
        for n in reversed(self._sizes):
            if n >= self._length:
                continue
            follower = self._follower[n].get(self._hash(self._length - n, self._length))
            if follower is None or not self._same(follower - n, self._length - n, n):
                continue
            return self._copy(follower, limit)
        return []

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

    def _hash(self, start: int, end: int) -> int:
        return hash(tuple(self._tokens[start - self._offset : end - self._offset]))

    def _same(self, a: int, b: int, n: int) -> bool:
        tokens, offset = self._tokens, self._offset
        return tokens[a - offset : a - offset + n] == tokens[b - offset : b - offset + n]
