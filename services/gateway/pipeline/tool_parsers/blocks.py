"""Formats whose calls sit in marked blocks: content, then `START body END`, where a body's parser
makes calls of it. Markers that only bracket a section of calls are dropped from the content."""

from __future__ import annotations

from typing import Callable

from radixserve.gateway.pipeline.text_markers import first_marker, partial_length
from radixserve.gateway.pipeline.tool_parsers.calls import ToolCall
from radixserve.gateway.pipeline.tool_parsers.streaming import Segment

BodyParser = Callable[[str], list[ToolCall] | None]  # None: not calls, the block stays content


class BlockScanner:
    def __init__(self, start: str, end: str, parse_body: BodyParser, dropped: tuple[str, ...] = ()):
        self._start, self._end, self._parse_body = start, end, parse_body
        self._markers = (start, *dropped)

    def scan(self, text: str, final: bool) -> tuple[list[Segment], str]:
        segments: list[Segment] = []
        while True:
            at, marker = first_marker(text, self._markers)
            if at < 0:
                held = 0 if final else partial_length(text, self._markers)
                segments.append(text[: len(text) - held])
                return segments, text[len(text) - held :]
            segments.append(text[:at])
            body_at = at + len(marker)
            if marker != self._start:
                text = text[body_at:]
                continue
            end = text.find(self._end, body_at)
            if end < 0:
                if not final:
                    return segments, text[at:]
                # An unclosed last block still counts when its body parses (END may be a stop string).
                segments.extend(self._calls_or_text(text[at:], text[body_at:]))
                return segments, ""
            segments.extend(self._calls_or_text(text[at : end + len(self._end)], text[body_at:end]))
            text = text[end + len(self._end) :]

    def _calls_or_text(self, block: str, body: str) -> list[Segment]:
        try:
            calls = self._parse_body(body)
        except (ValueError, TypeError):
            calls = None
        return list(calls) if calls else [block]
