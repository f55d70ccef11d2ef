"""Stop-string matching over streamed text: emit what is safe, hold back what may start a stop string."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopScan:
    emit: str
    held: str
    matched_stop: str | None = None


def first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(start, stop) of the earliest occurrence of any stop string; ties go to the first listed."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or start < best[0]):
            best = (start, stop)
    return best


def held_suffix_length(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = min(len(text), max((len(s) for s in stops), default=1) - 1)
    for length in range(longest, 0, -1):
        suffix = text[-length:]
        if any(stop.startswith(suffix) for stop in stops):
            return length
    return 0


def scan_for_stops(held: str, stops: list[str], final: bool) -> StopScan:
    """Split held text (held back so far + newly decoded) into what to emit now and what to keep."""
    stops = [s for s in stops if s]
    match = first_stop(held, stops)
    if match is not None:
        start, stop = match
        return StopScan(emit=held[:start], held="", matched_stop=stop)
    if final:
        return StopScan(emit=held, held="")
    keep = held_suffix_length(held, stops)
    return StopScan(emit=held[: len(held) - keep], held=held[len(held) - keep :])
