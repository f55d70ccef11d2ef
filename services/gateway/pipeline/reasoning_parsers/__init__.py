"""Reasoning out of generated text: per-format parsers that split it into reasoning and content,
whole or streamed."""

from radixserve.gateway.pipeline.reasoning_parsers.registry import (
    REASONING_PARSER_NAMES,
    REASONING_PARSERS,
    get_reasoning_parser,
)
from radixserve.gateway.pipeline.reasoning_parsers.splitter import (
    ReasoningParser,
    ReasoningSplit,
    ReasoningSplitter,
)

__all__ = [
    "REASONING_PARSER_NAMES",
    "REASONING_PARSERS",
    "get_reasoning_parser",
    "ReasoningParser",
    "ReasoningSplit",
    "ReasoningSplitter",
]
