"""OpenAI's harmony format (gpt-oss): messages `<|channel|>NAME[ to=RECIPIENT][ <|constrain|>json]<|message|>
BODY` ended by `<|end|>`, `<|call|>` or `<|return|>`, each after the first opened by `<|start|>assistant`.

HarmonyReader turns the output into events, streamed: a message's header, pieces of its body, its end,
and text outside any message. The analysis channel is reasoning; final and commentary are content;
a message to a recipient (`to=functions.NAME`) is a tool call, left whole in the content for the
gpt-oss tool parser."""

from __future__ import annotations

import re
from dataclasses import dataclass

from radixserve.gateway.pipeline.reasoning_parsers.splitter import Piece
from radixserve.gateway.pipeline.text_markers import first_marker, partial_length

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
_OPENERS = (START, CHANNEL)
_CHANNEL_NAME = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


@dataclass(frozen=True)
class Header:
    raw: str  # the header as generated, up to and with <|message|>
    channel: str
    recipient: str | None


def parse_header(raw: str) -> Header:
    channel = _CHANNEL_NAME.search(raw)
    recipient = _RECIPIENT.search(raw)
    return Header(
        raw, channel.group(1) if channel else "", recipient.group(1) if recipient else None
    )


@dataclass(frozen=True)
class Outside:
    text: str


@dataclass(frozen=True)
class Body:
    header: Header
    text: str


@dataclass(frozen=True)
class End:
    header: Header
    marker: str  # "" when the output ended inside the message


Event = Header | Outside | Body | End


class HarmonyReader:
    def __init__(self):
        self._header: Header | None = None  # the message being read

    def scan(self, text: str, final: bool) -> tuple[list[Event], str]:
        events: list[Event] = []
        while text:
            if self._header is not None:
                at, marker = first_marker(text, ENDS)
                if at < 0:
                    held = 0 if final else partial_length(text, ENDS)
                    if len(text) > held:
                        events.append(Body(self._header, text[: len(text) - held]))
                    if final:
                        events.append(End(self._header, ""))
                        self._header = None
                    return events, text[len(text) - held :]
                if at:
                    events.append(Body(self._header, text[:at]))
                events.append(End(self._header, marker))
                self._header = None
                text = text[at + len(marker) :]
                continue
            at, _ = first_marker(text, _OPENERS)
            if at < 0:
                held = 0 if final else partial_length(text, _OPENERS)
                if len(text) > held:
                    events.append(Outside(text[: len(text) - held]))
                return events, text[len(text) - held :]
            if at:
                events.append(Outside(text[:at]))
                text = text[at:]
            body_at = text.find(MESSAGE)
            if body_at < 0:
                if not final:
                    return events, text
                events.append(Outside(text))  # a header cut off: shown as it came
                return events, ""
            self._header = parse_header(text[: body_at + len(MESSAGE)])
            events.append(self._header)
            text = text[body_at + len(MESSAGE) :]
        return events, ""


def is_tool_call(header: Header) -> bool:
    return header.recipient is not None


class GptOssScanner:
    """Reasoning from the analysis channel; the final and commentary channels' bodies as content;
    tool-call messages kept whole (header, body, end marker) in the content."""

    def __init__(self):
        self._reader = HarmonyReader()

    def scan(self, text: str, final: bool) -> tuple[list[Piece], str]:
        events, rest = self._reader.scan(text, final)
        pieces: list[Piece] = []
        for event in events:
            if isinstance(event, Outside):
                pieces.append((False, event.text))
            elif isinstance(event, Header):
                if is_tool_call(event):
                    pieces.append((False, event.raw))
            elif isinstance(event, Body):
                if is_tool_call(event.header):
                    pieces.append((False, event.text))
                else:
                    pieces.append((event.header.channel == "analysis", event.text))
            elif is_tool_call(event.header):
                pieces.append((False, event.marker))
        return pieces, rest
