"""DeepSeek-V3 calls: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
```json\n{...}\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`; also V3.1's
`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`."""

from __future__ import annotations

import json
import re

from radixserve.gateway.pipeline.tool_parsers.blocks import BlockScanner
from radixserve.gateway.pipeline.tool_parsers.calls import ToolCall, serialise_arguments

SEP = "<｜tool▁sep｜>"
_SECTION = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
_FENCED = re.compile(r"\s*([^\n`]+?)\s*\n```(?:json)?\s*\n?(.*?)\n?```\s*", re.DOTALL)


def deepseekv3_scanner(tools: list[dict]) -> BlockScanner:
    return BlockScanner("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", _calls, dropped=_SECTION)


def _calls(body: str) -> list[ToolCall] | None:
    head, sep, rest = body.partition(SEP)
    if not sep:
        return None
    fenced = _FENCED.fullmatch(rest)
    if fenced:  # V3: the type before the separator, then the name and the fenced arguments
        name, arguments = fenced.group(1), fenced.group(2)
    else:  # V3.1: the name before the separator
        name, arguments = head.strip(), rest
    decoded = json.loads(arguments)
    if not name or not isinstance(decoded, dict):
        return None
    return [ToolCall(name=name, arguments=serialise_arguments(decoded))]
