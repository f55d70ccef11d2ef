"""The streaming driver shared by all formats, and non-streaming parsing as one feed of the whole text.

A format is a Scanner: given the text not yet resolved, it resolves what it can into content and
tool calls and returns the rest to be held until more text arrives. A call comes either whole (a
ToolCall) or as it is written: CallStart once its name is known, the arguments' text in pieces
(ArgumentsText), CallEnd. Around calls the driver drops separator whitespace, and holds trailing
whitespace until it knows whether a call follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Union

from radixserve.gateway.pipeline.tool_parsers.arguments import ArgumentsWriter
from radixserve.gateway.pipeline.tool_parsers.calls import (
    ParsedOutput,
    ToolCall,
    arguments_delta,
    call_start_delta,
)


@dataclass(frozen=True)
class CallStart:
    name: str


@dataclass(frozen=True)
class ArgumentsText:
    """Model text of the open call's arguments object (re-serialised by the driver)."""

    text: str


@dataclass(frozen=True)
class CallEnd:
    """The open call is over (its arguments may be cut short)."""


Segment = Union[str, ToolCall, CallStart, ArgumentsText, CallEnd]
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
        self._writer: ArgumentsWriter | None = None  # the open call's arguments
        self.tool_calls: list[ToolCall] = []

    def feed(self, delta_text: str) -> list[StreamEvent]:
        segments, self._unresolved = self._scanner.scan(self._unresolved + delta_text, final=False)
        return self._events(segments)

    def finish(self) -> list[StreamEvent]:
        segments, _ = self._scanner.scan(self._unresolved, final=True)
        self._unresolved = ""
        events = self._events(segments)
        if self._writer is not None:  # cut off inside its arguments
            events += self._events([CallEnd()])
        if self._held_whitespace:
            _append_content(events, self._held_whitespace)
            self._held_whitespace = ""
        return events

    def _events(self, segments: list[Segment]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for segment in segments:
            if isinstance(segment, ToolCall):
                self._start_call(segment, events)
                events.append(arguments_delta(len(self.tool_calls) - 1, segment.arguments))
                self._after_call = True
            elif isinstance(segment, CallStart):
                self._start_call(ToolCall(name=segment.name, arguments=""), events)
                self._writer = ArgumentsWriter()
            elif isinstance(segment, ArgumentsText):
                self._add_arguments(self._writer.feed(segment.text)[0], events)
            elif isinstance(segment, CallEnd):
                if self._writer is not None:
                    self._add_arguments(self._writer.flush(), events)
                self._writer = None
                self._after_call = True
            else:
                self._add_content(segment, events)
        return events

    def _start_call(self, call: ToolCall, events: list[StreamEvent]) -> None:
        self._held_whitespace = ""
        events.append(call_start_delta(len(self.tool_calls), call))
        self.tool_calls.append(call)

    def _add_arguments(self, text: str, events: list[StreamEvent]) -> None:
        if not text:
            return
        index = len(self.tool_calls) - 1
        self.tool_calls[index].arguments += text
        last = events[-1] if events else None
        if isinstance(last, dict) and last["index"] == index and "id" not in last:
            last["function"]["arguments"] += text
        else:
            events.append(arguments_delta(index, text))

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
