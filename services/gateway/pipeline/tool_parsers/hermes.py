"""Hermes / Qwen2.5 / Qwen3 calls: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` blocks."""

from __future__ import annotations

import json

from radixserve.gateway.pipeline.tool_parsers.calls import tool_call_from_object
from radixserve.gateway.pipeline.text_markers import partial_marker_length
from radixserve.gateway.pipeline.tool_parsers.streaming import Segment

START, END = "<tool_call>", "</tool_call>"


class HermesScanner:
    def scan(self, text: str, final: bool) -> tuple[list[Segment], str]:
        segments: list[Segment] = []
        while True:
            start = text.find(START)
            if start < 0:
                held = 0 if final else partial_marker_length(text, START)
                segments.append(text[: len(text) - held])
                return segments, text[len(text) - held :]
            segments.append(text[:start])
            body_start = start + len(START)
            end = text.find(END, body_start)
            if end < 0:
                if not final:
                    return segments, text[start:]
                # An unclosed last block still counts when its body is a whole call (e.g. END was a stop string).
                segments.append(_call_or_text(text[start:], text[body_start:]))
                return segments, ""
            segments.append(_call_or_text(text[start : end + len(END)], text[body_start:end]))
            text = text[end + len(END) :]


def _call_or_text(block: str, body: str) -> Segment:
    try:
        decoded = json.loads(body)
    except ValueError:
        return block
    return tool_call_from_object(decoded) or block
