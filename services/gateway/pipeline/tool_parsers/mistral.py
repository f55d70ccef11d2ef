"""Mistral calls after `[TOOL_CALLS]`: a JSON array of {"name", "arguments"} objects (v0.3 templates),
or one `NAME[ARGS]{...}` per marker (newer tokenizers; an optional `[CALL_ID]ID` before `[ARGS]`)."""

from __future__ import annotations

import json
import re

from radixserve.gateway.pipeline.text_markers import partial_marker_length
from radixserve.gateway.pipeline.tool_parsers.calls import (
    ToolCall,
    serialise_arguments,
    tool_call_from_object,
)
from radixserve.gateway.pipeline.tool_parsers.streaming import Segment

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_NAME_SO_FAR = re.compile(r"[\w.\-\[\]]*")  # may still become NAME[CALL_ID]ID[ARGS]
_decoder = json.JSONDecoder()
_MORE = object()  # the calls are not complete yet


class MistralScanner:
    def scan(self, text: str, final: bool) -> tuple[list[Segment], str]:
        segments: list[Segment] = []
        while True:
            at = text.find(TOOL_CALLS)
            if at < 0:
                held = 0 if final else partial_marker_length(text, TOOL_CALLS)
                segments.append(text[: len(text) - held])
                return segments, text[len(text) - held :]
            segments.append(text[:at])
            parsed = _calls_after_marker(text, at + len(TOOL_CALLS), final)
            if parsed is _MORE:
                return segments, text[at:]
            if parsed is None:  # not calls: the marker and what follows are content
                segments.append(TOOL_CALLS)
                text = text[at + len(TOOL_CALLS) :]
                continue
            calls, end = parsed
            segments.extend(calls)
            text = text[end:]


def _calls_after_marker(text: str, at: int, final: bool):
    """(calls, end) after a marker at `at`; _MORE when more text could complete them; None when
    what follows is not calls."""
    while at < len(text) and text[at].isspace():
        at += 1
    if at == len(text):
        return None if final else _MORE
    if text[at] in "[{":
        try:
            decoded, end = _decoder.raw_decode(text, at)
        except ValueError:
            return None if final else _MORE
        items = decoded if isinstance(decoded, list) else [decoded]
        calls = [tool_call_from_object(item) for item in items]
        return (calls, end) if calls and None not in calls else None
    args_at = text.find(ARGS, at)
    if args_at < 0:
        so_far = _NAME_SO_FAR.fullmatch(text, at)
        return None if final or not so_far else _MORE
    name = text[at:args_at].split(CALL_ID)[0]
    if not _NAME.fullmatch(name):
        return None
    start = args_at + len(ARGS)
    while start < len(text) and text[start].isspace():
        start += 1
    try:
        decoded, end = _decoder.raw_decode(text, start)
    except ValueError:
        return None if final else _MORE
    if not isinstance(decoded, dict):
        return None
    return [ToolCall(name=name, arguments=serialise_arguments(decoded))], end
