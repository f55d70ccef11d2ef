"""Reasoning in a `<think>` ... `</think>` block at the start of the output (DeepSeek-R1, Qwen3, GLM-4.5,
Kimi's `◁think▷` ... `◁/think▷`).

Formats whose chat template opens the block in the prompt (DeepSeek-R1, Qwen3 thinking models) start
inside it: their output is reasoning up to the end marker, and an opening marker the model repeats is
dropped. Otherwise only an opening marker at the start of the output (after whitespace) opens it.
Output cut off (max_tokens) before the end marker is all reasoning. Whitespace around the reasoning
and between the end marker and the content is dropped."""

from __future__ import annotations

from radixserve.gateway.pipeline.reasoning_parsers.splitter import Piece
from radixserve.gateway.pipeline.text_markers import PhaseScanner, partial_marker_length


class ThinkScanner(PhaseScanner):
    def __init__(self, start: str, end: str, starts_inside: bool):
        self._start, self._end, self._starts_inside = start, end, starts_inside
        self._phase = self._opening
        self._reasoning_begun = False

    def _opening(self, text: str, final: bool, pieces: list[Piece]) -> str:
        head = text.lstrip()
        if head.startswith(self._start):
            self._phase = self._reasoning
            return head[len(self._start) :]
        if not final and self._start.startswith(head):  # nothing yet, or the marker still arriving
            return text
        self._phase = self._reasoning if self._starts_inside else self._content
        return text

    def _reasoning(self, text: str, final: bool, pieces: list[Piece]) -> str:
        if not self._reasoning_begun:
            text = text.lstrip()
            self._reasoning_begun = bool(text)
        at = text.find(self._end)
        if at >= 0:
            pieces.append((True, text[:at].rstrip()))
            self._phase = self._after_end
            return text[at + len(self._end) :]
        held = 0 if final else partial_marker_length(text, self._end)
        body = text[: len(text) - held]
        # Trailing whitespace waits: it is dropped when the end marker follows it.
        resolved = body.rstrip()
        pieces.append((True, resolved))
        return "" if final else text[len(resolved) :]

    def _after_end(self, text: str, final: bool, pieces: list[Piece]) -> str:
        text = text.lstrip()
        if text:
            self._phase = self._content
        return text

    def _content(self, text: str, final: bool, pieces: list[Piece]) -> str:
        pieces.append((False, text))
        return ""
