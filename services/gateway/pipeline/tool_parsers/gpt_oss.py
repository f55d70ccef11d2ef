"""gpt-oss (harmony) calls: a message to `functions.NAME`, `<|channel|>commentary to=functions.NAME
<|constrain|>json<|message|>{...}<|call|>`. Other messages' bodies are content, their framing dropped
(with --reasoning-parser gpt-oss the analysis channel has already gone to reasoning)."""

from __future__ import annotations

import json

from radixserve.gateway.pipeline.reasoning_parsers.harmony import (
    Body,
    End,
    Header,
    HarmonyReader,
    Outside,
)
from radixserve.gateway.pipeline.tool_parsers.calls import ToolCall, serialise_arguments
from radixserve.gateway.pipeline.tool_parsers.streaming import Segment

FUNCTIONS = "functions."


def _is_function_call(header: Header) -> bool:
    return (header.recipient or "").startswith(FUNCTIONS)


class GptOssToolScanner:
    def __init__(self):
        self._reader = HarmonyReader()
        self._arguments = ""

    def scan(self, text: str, final: bool) -> tuple[list[Segment], str]:
        events, rest = self._reader.scan(text, final)
        segments: list[Segment] = []
        for event in events:
            if isinstance(event, Outside):
                segments.append(event.text)
            elif isinstance(event, Header):
                self._arguments = ""
            elif isinstance(event, Body):
                if _is_function_call(event.header):
                    self._arguments += event.text
                else:
                    segments.append(event.text)
            elif isinstance(event, End) and _is_function_call(event.header):
                segments.append(self._call_or_text(event))
        return segments, rest

    def _call_or_text(self, end: End) -> Segment:
        header, arguments = end.header, self._arguments
        self._arguments = ""
        try:
            decoded = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            return header.raw + arguments + end.marker
        name = header.recipient.removeprefix(FUNCTIONS)
        return ToolCall(name=name, arguments=serialise_arguments(decoded))
