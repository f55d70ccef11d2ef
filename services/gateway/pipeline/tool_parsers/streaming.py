"""The streaming driver shared by all formats, and non-streaming parsing as one feed of the whole text.

A format is a Scanner: given the text not yet resolved, it resolves what it can into content and
tool calls and returns the rest to be held until more text arrives. Around resolved calls the driver
drops separator whitespace, and holds trailing whitespace until it knows whether a call follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Union

from radixserve.gateway.pipeline.tool_parsers.calls import ParsedOutput, ToolCall, tool_call_deltas

Segment = Union[str, ToolCall]
StreamEvent = Union[str, dict]  # a content delta, or one OpenAI `delta.tool_calls` item


class Scanner(Protocol):
    def scan(self, text: str, final: bool) -> tuple[list[Segment], str]:
        """Resolve a prefix of `text`; return its segments and the unresolved rest ("" when final)."""


class StreamingToolParser:
    """Turns one choice's text deltas into content deltas and tool-call deltas."""

    def __init__(self, scanner: Scanner):
        self._scanner = scanner
        self._unresolved = ""
        self._held_whitespace = ""
        self._after_call = False
        self.tool_calls: list[ToolCall] = []

    def feed(self, delta_text: str) -> list[StreamEvent]:
        segments, self._unresolved = self._scanner.scan(self._unresolved + delta_text, final=False)
        return self._events(segments)

    def finish(self) -> list[StreamEvent]:
        segments, _ = self._scanner.scan(self._unresolved, final=True)
        self._unresolved = ""
        events = self._events(segments)
        if self._held_whitespace:
            _append_content(events, self._held_whitespace)
            self._held_whitespace = ""
        return events

    def _events(self, segments: list[Segment]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for segment in segments:
            if isinstance(segment, ToolCall):
                self._held_whitespace = ""
                self._after_call = True
                events.extend(tool_call_deltas(len(self.tool_calls), segment))
                self.tool_calls.append(segment)
            else:
                self._add_content(segment, events)
        return events

    def _add_content(self, text: str, events: list[StreamEvent]) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._held_whitespace + text
        body = text.rstrip()
        self._held_whitespace = text[len(body) :]
        if body:
            _append_content(events, body)


def _append_content(events: list[StreamEvent], text: str) -> None:
    if events and isinstance(events[-1], str):
        events[-1] += text
    else:
        events.append(text)


@dataclass(frozen=True)
class ToolParser:
    """A tool-call format, selectable by name with --tool-call-parser."""

    name: str
    new_scanner: Callable[
        [list[dict]], Scanner
    ]  # given the request's tools (some formats type by them)
    # Its markers are special tokens of the model's tokenizer: the output is detokenized with them.
    needs_special_tokens: bool = False

    def streaming(self, tools: list[dict] | None = None) -> StreamingToolParser:
        return StreamingToolParser(self.new_scanner(tools or []))

    def parse(self, text: str, tools: list[dict] | None = None) -> ParsedOutput:
        stream = self.streaming(tools)
        events = stream.feed(text) + stream.finish()
        content = "".join(event for event in events if isinstance(event, str))
        return ParsedOutput(
            content=None if stream.tool_calls and not content else content,
            tool_calls=stream.tool_calls,
        )
