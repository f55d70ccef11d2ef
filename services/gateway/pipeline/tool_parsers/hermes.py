"""Hermes / Qwen2.5 / Qwen3 calls: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` blocks.

A block that opens `{"name": "...", "arguments": {` streams its arguments as they come; any other
block is resolved whole when it closes (a call, or content when it is not one)."""

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

START, END = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")


class HermesScanner(PhaseScanner):
    def __init__(self):
        self._phase = self._content
        self._writer: ArgumentsWriter | None = None  # tracks the open call's arguments

    def _content(self, text: str, final: bool, segments: list[Segment]) -> str:
        start = text.find(START)
        if start < 0:
            held = 0 if final else partial_marker_length(text, START)
            segments.append(text[: len(text) - held])
            return text[len(text) - held :]
        segments.append(text[:start])
        self._phase = self._header
        return text[start:]

    def _header(self, text: str, final: bool, segments: list[Segment]) -> str:
        """text opens with START: a streamed call once its header is whole, else a whole block."""
        status, name, at = match_call_header(text, len(START), ARGUMENT_KEYS)
        if status == YES:
            segments.append(CallStart(name))
            self._writer = ArgumentsWriter()
            self._phase = self._arguments
            return text[at:]
        if status == MORE and not final:
            return text
        self._phase = self._block
        return text

    def _arguments(self, text: str, final: bool, segments: list[Segment]) -> str:
        """Up to the arguments' closing brace; an END outside a string ends a cut-short call."""
        writer = self._writer
        while True:
            end = text.find(END)
            upto = (
                end if end >= 0 else len(text) - (0 if final else partial_marker_length(text, END))
            )
            _, closed = writer.feed(text[:upto])
            if closed is not None:
                segments += [ArgumentsText(text[:closed]), CallEnd()]
                self._phase = self._after_arguments
                return text[closed:]
            segments.append(ArgumentsText(text[:upto]))
            if end < 0:
                if final:
                    segments.append(CallEnd())
                    self._phase = self._content
                return text[upto:]
            if not writer.in_string:
                segments.append(CallEnd())
                self._phase = self._content
                return text[end + len(END) :]
            segments.append(ArgumentsText(END))  # END inside a string is text
            writer.feed(END)
            text = text[end + len(END) :]

    def _after_arguments(self, text: str, final: bool, segments: list[Segment]) -> str:
        """The rest of the block after a streamed call's arguments: dropped up to END."""
        end = text.find(END)
        if end >= 0:
            self._phase = self._content
            return text[end + len(END) :]
        if final:
            self._phase = self._content
            return ""
        return text[len(text) - partial_marker_length(text, END) :]

    def _block(self, text: str, final: bool, segments: list[Segment]) -> str:
        """A block that does not open like a streamed call, resolved whole when it closes."""
        body_start = len(START)
        end = text.find(END, body_start)
        if end < 0:
            if not final:
                return text
            # An unclosed last block still counts when its body is a whole call (e.g. END was a stop string).
            segments.append(_call_or_text(text, text[body_start:]))
            self._phase = self._content
            return ""
        segments.append(_call_or_text(text[: end + len(END)], text[body_start:end]))
        self._phase = self._content
        return text[end + len(END) :]


def _call_or_text(block: str, body: str) -> Segment:
    try:
        decoded = json.loads(body)
    except ValueError:
        return block
    return tool_call_from_object(decoded) or block
