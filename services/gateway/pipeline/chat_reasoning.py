"""Reasoning in chat outputs: which parser splits a request's output (--reasoning-parser, the request's
separate_reasoning and chat_template_kwargs), for every API that returns chat text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from radixserve.gateway.pipeline.reasoning_parsers import (
    ReasoningParser,
    ReasoningSplit,
    ReasoningSplitter,
    get_reasoning_parser,
)

if TYPE_CHECKING:
    from radixserve.gateway.pipeline.engine import Engine

# chat_template_kwargs that turn thinking off (Qwen3 and GLM-4.5 templates; DeepSeek-V3.1's "thinking").
_THINKING_SWITCHES = ("enable_thinking", "thinking")


def reasoning_parser_for(
    engine: Engine,
    separate_reasoning: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    constrained: bool = False,
) -> ReasoningParser | None:
    """The parser that splits this request's output, or None when its text is all content: no
    --reasoning-parser, separate_reasoning false, thinking turned off in chat_template_kwargs, or
    output constrained (a JSON schema, regex or grammar from the first token has no reasoning)."""
    name = engine.args.reasoning_parser
    if name is None or not separate_reasoning or constrained:
        return None
    kwargs = chat_template_kwargs or {}
    if any(kwargs.get(switch) is False for switch in _THINKING_SWITCHES):
        return None
    return get_reasoning_parser(name)


def split_text(parser: ReasoningParser | None, text: str) -> ReasoningSplit:
    """A whole output's reasoning and content (all content without a parser)."""
    return parser.parse(text) if parser is not None else ReasoningSplit(None, text)


def split_delta(splitter: ReasoningSplitter | None, text: str) -> tuple[str, str]:
    """A streamed delta's (reasoning, content)."""
    return splitter.feed(text) if splitter is not None else ("", text)


def split_rest(splitter: ReasoningSplitter | None) -> tuple[str, str]:
    """What a splitter held back, at the end of the stream: (reasoning, content)."""
    return splitter.finish() if splitter is not None else ("", "")


class CountingSplitter:
    """One choice's output split into (reasoning, content) delta by delta, counting its reasoning
    tokens: those of the deltas up to the one that brings the first content, when the output has
    reasoning (so the marker that ends the reasoning counts, and the first content tokens of that
    delta too: a delta's tokens are not split)."""

    def __init__(self, parser: ReasoningParser | None):
        self._splitter = parser.splitter() if parser is not None else None
        self._had_reasoning = False
        self._content_started = False
        self._tokens_before_content = 0

    def feed(self, text: str, tokens: int) -> tuple[str, str]:
        reasoning, content = split_delta(self._splitter, text)
        self._count(reasoning, content, tokens)
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        reasoning, content = split_rest(self._splitter)
        self._count(reasoning, content, 0)
        return reasoning, content

    def _count(self, reasoning: str, content: str, tokens: int) -> None:
        self._had_reasoning = self._had_reasoning or bool(reasoning)
        if not self._content_started:
            self._tokens_before_content += tokens
            self._content_started = bool(content)

    @property
    def reasoning_tokens(self) -> int:
        return self._tokens_before_content if self._had_reasoning else 0


class ReasoningDelivery:
    """How a streamed choice's reasoning reaches the client: as it comes; with stream_reasoning
    false (SGLang's), held and sent in one piece once the content starts or the output ends; with
    include_reasoning false (vLLM's), not at all."""

    def __init__(self, stream_reasoning: bool = True, include_reasoning: bool = True):
        self._stream = stream_reasoning
        self._include = include_reasoning
        self._held = ""

    def deliver(self, reasoning: str, flush: bool) -> str:
        """The reasoning to send now, given this delta's; flush: the reasoning is over."""
        if not self._include:
            return ""
        if self._stream:
            return reasoning
        self._held += reasoning
        if not flush:
            return ""
        held, self._held = self._held, ""
        return held
