"""Incremental detokenization: token ids in, text that is safe to show out. Pure: no I/O, no globals.

Decoding a single token can give half of a multi-byte character, and a token's text can depend on
its neighbours (merged bytes, leading-space rules). So the text of the tokens [prefix_offset:]
is decoded and compared with the text of [prefix_offset:read_offset], whose text was already
emitted; the difference is new text, emitted once it no longer ends in U+FFFD (the replacement
character an incomplete UTF-8 sequence decodes to). Ids before prefix_offset are never needed again
and are dropped, so the state stays small however long the generation runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from radixserve.detokenizer.stop_strings import scan_for_stops

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class DecodeState:
    window_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    held_text: str = ""
    emitted_chars: int = 0


@dataclass
class DecodeStep:
    text: str
    state: DecodeState
    stopped: bool = False
    matched_stop: str = ""
    # When stopped: how many of the new ids it took to reach the stop (the ones after it are dropped).
    stop_token_count: int = 0


def _take_new_text(
    tokenizer: Decoder,
    window: list[int],
    prefix: int,
    read: int,
    skip_special_tokens: bool,
    final: bool,
) -> tuple[str, list[int], int]:
    """The new stable text of the window, the window left after taking it, and its read offset.

    The returned window always starts at its prefix offset (ids before it are dropped).
    """
    prefix_text = tokenizer.decode(window[prefix:read], skip_special_tokens=skip_special_tokens)
    full_text = tokenizer.decode(window[prefix:], skip_special_tokens=skip_special_tokens)
    incomplete = full_text.endswith(REPLACEMENT_CHAR) and not final
    if len(full_text) > len(prefix_text) and not incomplete:
        return full_text[len(prefix_text) :], window[read:], len(window) - read
    if len(full_text) == len(prefix_text) and not incomplete:
        # The new ids added no text (e.g. skipped special tokens): forget them.
        return "", window[prefix:read], read - prefix
    return "", window[prefix:], read - prefix


@dataclass(frozen=True)
class _DecodeOptions:
    """decode_step's settings, the same for each id it feeds (final is not: when it feeds the ids one
    at a time, only the last one's decode is final)."""

    stop: list[str]
    skip_special_tokens: bool
    stop_regex: list[str]


def decode_step(
    tokenizer: Decoder,
    state: DecodeState,
    new_ids: list[int],
    stop: list[str] = (),
    skip_special_tokens: bool = True,
    final: bool = False,
    stop_regex: list[str] = (),
) -> DecodeStep:
    """Feed new_ids; return the text now safe to show and the state for the next call.

    With final, everything left is emitted (an incomplete character as U+FFFD). A stop string ends
    the text right before its first occurrence and sets stopped/matched_stop; so does a match of a
    stop regex (matched_stop: its pattern), and stop_token_count says how many of new_ids it took.
    """
    options = _DecodeOptions(stop, skip_special_tokens, stop_regex)
    if len(new_ids) > 1 and (any(stop) or stop_regex):
        return _decode_one_by_one(tokenizer, state, new_ids, options, final)
    step = _decode(tokenizer, state, new_ids, options, final)
    if step.stopped:
        step.stop_token_count = len(new_ids)
    return step


def _decode_one_by_one(
    tokenizer: Decoder,
    state: DecodeState,
    new_ids: list[int],
    options: _DecodeOptions,
    final: bool,
) -> DecodeStep:
    """Several ids (--stream-interval N, speculative steps) against stop strings: fed one at a time, as
    when they come one per call, so that the stop is found at the same token (a batch's text can end in
    half a character and be held back whole, which would find it a batch late) and stop_token_count says
    which; the ids after it are never decoded."""
    texts = []
    for count, token in enumerate(new_ids, 1):
        last = count == len(new_ids)
        step = _decode(tokenizer, state, [token], options, final and last)
        texts.append(step.text)
        state = step.state
        if step.stopped:
            return DecodeStep("".join(texts), state, True, step.matched_stop, count)
    return DecodeStep("".join(texts), state)


def _decode(
    tokenizer: Decoder,
    state: DecodeState,
    new_ids: list[int],
    options: _DecodeOptions,
    final: bool,
) -> DecodeStep:
    new_text, window, read = _take_new_text(
        tokenizer,
        list(state.window_ids) + list(new_ids),
        state.prefix_offset,
        state.read_offset,
        options.skip_special_tokens,
        final,
    )
    scan = scan_for_stops(
        state.held_text + new_text, list(options.stop), final, list(options.stop_regex)
    )
    next_state = DecodeState(window, 0, read, scan.held, state.emitted_chars + len(scan.emit))
    return DecodeStep(scan.emit, next_state, scan.matched_stop is not None, scan.matched_stop or "")
