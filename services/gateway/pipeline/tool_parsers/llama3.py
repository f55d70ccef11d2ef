"""Llama 3.1 / 3.2 JSON calls: `{"name": ..., "parameters": {...}}`, several joined by `;`.

Calls are recognised when the output opens with a JSON object, or after `<|python_tag|>`.
Once something that is not a call follows, the rest of the output is content. A call that opens
`{"name": "...", "parameters": {` streams its arguments as they come; others resolve whole."""

from __future__ import annotations

import json

from radixserve.gateway.pipeline.tool_parsers.arguments import (
    MORE,
    YES,
    ArgumentsWriter,
    match_call_header,
)
from radixserve.gateway.pipeline.tool_parsers.calls import tool_call_from_object
from radixserve.gateway.pipeline.text_markers import PhaseScanner, partial_marker_length
from radixserve.gateway.pipeline.tool_parsers.streaming import (
    ArgumentsText,
    CallEnd,
    CallStart,
    Segment,
)

PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("parameters", "arguments")
_decoder = json.JSONDecoder()


class Llama3Scanner(PhaseScanner):
    def __init__(self):
        self._phase = self._undecided
        self._made_call = False
        self._writer: ArgumentsWriter | None = None  # the open call's arguments, then its object

    def _undecided(self, text: str, final: bool, segments: list[Segment]) -> str:
        head = text.lstrip()
        if head.startswith("{") or head.startswith(PYTHON_TAG):
            self._phase = self._calls
        elif head and (final or not PYTHON_TAG.startswith(head)):
            self._phase = self._content_until_tag
        elif final:
            self._phase = self._plain_content
        return text

    def _content_until_tag(self, text: str, final: bool, segments: list[Segment]) -> str:
        at = text.find(PYTHON_TAG)
        if at >= 0:
            segments.append(text[:at])
            self._phase = self._calls
            return text[at:]
        held = 0 if final else partial_marker_length(text, PYTHON_TAG)
        segments.append(text[: len(text) - held])
        return text[len(text) - held :]

    def _calls(self, text: str, final: bool, segments: list[Segment]) -> str:
        resolved = 0
        while True:
            at = _skip_separators(text, resolved)
            rest = text[at:]
            if not final and PYTHON_TAG.startswith(
                rest
            ):  # nothing more yet, or a tag still arriving
                return text[resolved:]
            if not rest and self._made_call:  # trailing separators
                return ""
            call = None
            if rest.startswith("{"):
                status, name, brace = match_call_header(text, at, ARGUMENT_KEYS)
                if status == MORE and not final:
                    return text[resolved:]
                if status == YES:
                    segments.append(CallStart(name))
                    self._writer = ArgumentsWriter()
                    self._phase = self._arguments
                    return text[brace:]
                try:
                    decoded, end = _decoder.raw_decode(text, at)
                except ValueError:  # not complete yet, or not JSON
                    if not final:
                        return text[resolved:]
                else:
                    call = tool_call_from_object(decoded, ARGUMENT_KEYS)
            if call is None:
                self._phase = self._plain_content
                return text[resolved:]
            segments.append(call)
            self._made_call = True
            resolved = end

    def _arguments(self, text: str, final: bool, segments: list[Segment]) -> str:
        _, closed = self._writer.feed(text)
        if closed is None:
            segments.append(ArgumentsText(text))
            if final:
                segments.append(CallEnd())
            return ""
        segments += [ArgumentsText(text[:closed]), CallEnd()]
        self._made_call = True
        self._writer = ArgumentsWriter()
        self._writer.depth = 1  # what is left of the call's own object, dropped
        self._phase = self._rest_of_call
        return text[closed:]

    def _rest_of_call(self, text: str, final: bool, segments: list[Segment]) -> str:
        _, closed = self._writer.feed(text)
        if closed is None:
            return ""
        self._phase = self._calls
        return text[closed:]

    def _plain_content(self, text: str, final: bool, segments: list[Segment]) -> str:
        segments.append(text)
        return ""


def _skip_separators(text: str, at: int) -> int:
    while at < len(text):
        if text[at].isspace() or text[at] == ";":
            at += 1
        elif text.startswith(PYTHON_TAG, at):
            at += len(PYTHON_TAG)
        else:
            break
    return at
