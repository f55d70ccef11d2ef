"""Finding markers (`</think>`, `<tool_call>`, ...) in text that arrives in pieces."""

from __future__ import annotations


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
