"""stop_regex (SGLang): the detokenizer's stop scan ends the text where a regex first matches, holds back
text where a match may still begin, and bounds what a pattern may cost."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from radixserve.v1 import detokenizer_pb2, detokenizer_pb2_grpc
from radixserve.common import grpc_util
from radixserve.detokenizer.server import start_server
from radixserve.detokenizer.incremental import DecodeState, decode_step
from radixserve.detokenizer.stop_strings import (
    MAX_STOP_REGEX_CHARS,
    STOP_REGEX_WINDOW,
    compile_stop_regex,
    scan_for_stops,
)


class CharDecoder:
    """One character per id (id = code point)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))

    def __len__(self):
        return 0x110000


def feed(text: str, stop_regex: list[str], stop: list[str] = (), chunk: int = 1):
    """Stream text through decode_step chunk characters at a time; (emitted text, matched, steps)."""
    state, out, matched = DecodeState(), [], ""
    ids = [ord(c) for c in text]
    for i in range(0, len(ids), chunk):
        step = decode_step(
            CharDecoder(), state, ids[i : i + chunk], list(stop), stop_regex=stop_regex
        )
        out.append(step.text)
        state = step.state
        if step.stopped:
            return "".join(out), step.matched_stop
    step = decode_step(CharDecoder(), state, [], list(stop), final=True, stop_regex=stop_regex)
    return "".join(out) + step.text, matched


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_text_ends_right_before_the_first_match_at_any_chunking(chunk):
    text, matched = feed("The answer is 42. More text", [r"\d+\."], chunk=chunk)
    assert (text, matched) == ("The answer is ", r"\d+\.")


def test_the_earliest_of_a_stop_string_and_a_regex_wins():
    assert feed("abc END xyz 123", [r"\d{3}"], stop=["END"]) == ("abc ", "END")
    assert feed("abc 123 END", [r"\d{3}"], stop=["END"]) == ("abc ", r"\d{3}")


def test_text_that_may_start_a_match_is_held_until_decided():
    scan = scan_for_stops("value: 4", [], False, [r"\d+;"])
    assert (scan.emit, scan.held, scan.matched_stop) == ("value: ", "4", None)
    scan = scan_for_stops("value: 4x", [], False, [r"\d+;"])
    assert (scan.emit, scan.held) == ("value: 4x", "")


def test_without_a_match_everything_is_emitted_at_the_end():
    assert feed("no digits here", [r"\d"]) == ("no digits here", "")


def test_held_text_is_bounded_by_the_window():
    scan = scan_for_stops("<" + "a" * (3 * STOP_REGEX_WINDOW), [], False, [r"<a*>"])
    assert len(scan.held) == STOP_REGEX_WINDOW and scan.emit.startswith("<")


def test_a_catastrophic_pattern_costs_a_bounded_time():
    compile_stop_regex(r"(a|aa)+$b")
    started = time.monotonic()
    scan = scan_for_stops("a" * 5000 + "c", [], False, [r"(a|aa)+$b", r"(x+x+)+y"])
    assert time.monotonic() - started < 2.0 and scan.matched_stop is None


@pytest.mark.parametrize(
    "pattern,why",
    [
        ("(", "invalid stop regex"),
        ("", "must not be empty"),
        ("a*", "matches the empty string"),
        ("a" * (MAX_STOP_REGEX_CHARS + 1), "at most"),
    ],
)
def test_bad_patterns_are_refused_with_a_reason(pattern, why):
    with pytest.raises(ValueError, match=why):
        compile_stop_regex(pattern)


async def _over_grpc(items: list[detokenizer_pb2.DetokenizerDecodeItem]):
    server, port = await start_server(CharDecoder(), "127.0.0.1:0")
    try:
        async with grpc_util.aio_channel(f"127.0.0.1:{port}") as channel:
            stub = detokenizer_pb2_grpc.DetokenizerStub(channel)
            return await stub.Decode(detokenizer_pb2.DetokenizerDecodeRequest(items=items))
    finally:
        await server.stop(None)


def test_the_service_applies_stop_regexes_and_refuses_bad_ones():
    ids = [ord(c) for c in "total: 12 apples"]
    item = detokenizer_pb2.DetokenizerDecodeItem(
        request_id="r", new_token_ids=ids, stop_regex=[r"\d+ a"], final=True
    )
    [result] = asyncio.run(_over_grpc([item])).results
    assert (result.text, result.stopped, result.matched_stop) == ("total: ", True, r"\d+ a")
    for bad in (["("], ["a", "b", "c", "d", "e"]):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            asyncio.run(
                _over_grpc([detokenizer_pb2.DetokenizerDecodeItem(request_id="x", stop_regex=bad)])
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
