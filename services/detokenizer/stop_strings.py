"""Stop strings and stop regexes over streamed text: emit what is safe, hold back what may start a match.

Stop regexes (SGLang's stop_regex) use the `regex` module, whose partial matching says where a match may
still begin at the end of the text, so that text is held back like a stop string's prefix. Their cost is
bounded: a few short patterns, at most STOP_REGEX_WINDOW characters held back (a match longer than that
is not found), and each search cut off after STOP_REGEX_TIMEOUT_S (a timed-out search matches nothing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import regex

MAX_STOP_REGEXES = 4
MAX_STOP_REGEX_CHARS = 512
STOP_REGEX_WINDOW = 1024
STOP_REGEX_TIMEOUT_S = 0.01


@dataclass
class StopScan:
    emit: str
    held: str
    matched_stop: str | None = None


@functools.lru_cache(maxsize=256)
def compile_stop_regex(pattern: str) -> regex.Pattern:
    """The compiled pattern, or ValueError saying why it cannot be a stop regex."""
    if not pattern:
        raise ValueError("a stop regex must not be empty")
    if len(pattern) > MAX_STOP_REGEX_CHARS:
        raise ValueError(f"a stop regex may have at most {MAX_STOP_REGEX_CHARS} characters")
    try:
        compiled = regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError) as e:
        raise ValueError(f"invalid stop regex {pattern!r}: {e}") from None
    if _search(compiled, "") is not None:
        raise ValueError(f"stop regex {pattern!r} matches the empty string")
    return compiled


def _search(pattern: regex.Pattern, text: str, partial: bool = False):
    try:
        return pattern.search(text, partial=partial, timeout=STOP_REGEX_TIMEOUT_S)
    except TimeoutError:
        return None


def first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(start, stop) of the earliest occurrence of any stop string; ties go to the first listed."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or start < best[0]):
            best = (start, stop)
    return best


def first_regex_stop(text: str, patterns: list[str]) -> tuple[int, str] | None:
    """(start, pattern) of the earliest complete match of any stop regex."""
    best: tuple[int, str] | None = None
    for pattern in patterns:
        match = _search(compile_stop_regex(pattern), text)
        if match is not None and (best is None or match.start() < best[0]):
            best = (match.start(), pattern)
    return best


def held_suffix_length(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = min(len(text), max((len(s) for s in stops), default=1) - 1)
    for length in range(longest, 0, -1):
        suffix = text[-length:]
        if any(stop.startswith(suffix) for stop in stops):
            return length
    return 0


def regex_held_length(text: str, patterns: list[str]) -> int:
    """Length of the tail of text where a stop regex match may still begin (at most the window)."""
    held = 0
    for pattern in patterns:
        match = _search(compile_stop_regex(pattern), text, partial=True)
        if match is not None and match.partial:
            held = max(held, len(text) - match.start())
    return min(held, STOP_REGEX_WINDOW)


def scan_for_stops(
    held: str, stops: list[str], final: bool, stop_regexes: list[str] = ()
) -> StopScan:
    """Split held text (held back so far + newly decoded) into what to emit now and what to keep."""
    stops = [s for s in stops if s]
    matches = [
        m for m in (first_stop(held, stops), first_regex_stop(held, list(stop_regexes))) if m
    ]
    if matches:
        start, stop = min(matches, key=lambda m: m[0])
        return StopScan(emit=held[:start], held="", matched_stop=stop)
    if final:
        return StopScan(emit=held, held="")
    keep = max(held_suffix_length(held, stops), regex_held_length(held, list(stop_regexes)))
    return StopScan(emit=held[: len(held) - keep], held=held[len(held) - keep :])
