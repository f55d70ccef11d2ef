"""The streaming driver shared by all reasoning formats, and whole-text parsing as one feed.

A format is a Scanner: given the text not yet resolved, it resolves what it can into reasoning and
content pieces and returns the rest to hold until more text arrives (a marker may be cut by a delta)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

Piece = tuple[bool, str]  # (is reasoning, text)


class ReasoningScanner(Protocol):
    def scan(self, text: str, final: bool) -> tuple[list[Piece], str]:
        """Resolve a prefix of `text`; return its pieces and the unresolved rest ("" when final)."""


@dataclass
class ReasoningSplit:
    reasoning: str | None  # None: the output had no reasoning
    content: str


class ReasoningSplitter:
    """Splits one choice's text deltas into reasoning deltas and content deltas."""

    def __init__(self, scanner: ReasoningScanner):
        self._scanner = scanner
        self._unresolved = ""

    def feed(self, delta_text: str) -> tuple[str, str]:
        """(reasoning delta, content delta) of one text delta; either may be ""."""
        pieces, self._unresolved = self._scanner.scan(self._unresolved + delta_text, final=False)
        return _joined(pieces)

    def finish(self) -> tuple[str, str]:
        """What was held back, at the end of the output."""
        pieces, _ = self._scanner.scan(self._unresolved, final=True)
        self._unresolved = ""
        return _joined(pieces)


def _joined(pieces: list[Piece]) -> tuple[str, str]:
    reasoning = "".join(text for is_reasoning, text in pieces if is_reasoning)
    content = "".join(text for is_reasoning, text in pieces if not is_reasoning)
    return reasoning, content


@dataclass(frozen=True)
class ReasoningParser:
    """A reasoning format, selectable by name with --reasoning-parser."""

    name: str
    new_scanner: Callable[[], ReasoningScanner]
    # Its markers are special tokens of the model's tokenizer: the output is detokenized with them.
    needs_special_tokens: bool = False

    def splitter(self) -> ReasoningSplitter:
        return ReasoningSplitter(self.new_scanner())

    def parse(self, text: str) -> ReasoningSplit:
        splitter = self.splitter()
        reasoning, content = splitter.feed(text)
        more_reasoning, more_content = splitter.finish()
        return ReasoningSplit(reasoning + more_reasoning or None, content + more_content)
