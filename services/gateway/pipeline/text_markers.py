"""Scanning text that arrives in pieces: finding markers (`</think>`, `<tool_call>`, ...) and running
a scanner's phases."""

from __future__ import annotations

from typing import Any, Callable


class PhaseScanner:
    """A scanner written as phases: a phase takes the unresolved text, appends what it resolves to
    the output list, may switch self._phase, and returns the rest. scan() runs phases until one
    leaves the phase as it was (it waits for more text)."""

    _phase: Callable[[str, bool, list], str]

    def scan(self, text: str, final: bool) -> tuple[list[Any], str]:
        out: list[Any] = []
        while True:
            phase = self._phase
            text = phase(text, final, out)
            if self._phase is phase:
                return out, text


def partial_marker_length(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the beginning of `marker`."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def partial_length(text: str, markers: tuple[str, ...]) -> int:
    """The longest end of `text` that could begin any of `markers`."""
    return max((partial_marker_length(text, m) for m in markers), default=0)


def first_marker(text: str, markers: tuple[str, ...], start: int = 0) -> tuple[int, str]:
    """The earliest of `markers` in text[start:]: (its position, the marker), or (-1, "")."""
    found = [(at, m) for m in markers if (at := text.find(m, start)) >= 0]
    return min(found, key=lambda hit: (hit[0], -len(hit[1]))) if found else (-1, "")
