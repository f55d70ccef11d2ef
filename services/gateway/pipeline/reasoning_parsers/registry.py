"""Reasoning parsers by --reasoning-parser name (SGLang's names, and vLLM's where they differ)."""

from __future__ import annotations

from radixserve.gateway.pipeline.reasoning_parsers.harmony import GptOssScanner
from radixserve.gateway.pipeline.reasoning_parsers.splitter import ReasoningParser
from radixserve.gateway.pipeline.reasoning_parsers.think import ThinkScanner


def _think(
    name: str, starts_inside: bool, start="<think>", end="</think>", special=False
) -> ReasoningParser:
    return ReasoningParser(name, lambda: ThinkScanner(start, end, starts_inside), special)


# DeepSeek-R1's and the Qwen3 thinking models' templates open <think> in the prompt.
_DEEPSEEK_R1 = _think("deepseek-r1", starts_inside=True)
_GPT_OSS = ReasoningParser("gpt-oss", GptOssScanner, needs_special_tokens=True)

REASONING_PARSERS: dict[str, ReasoningParser] = {
    "deepseek-r1": _DEEPSEEK_R1,
    "deepseek_r1": _DEEPSEEK_R1,  # vLLM
    "qwen3": _think("qwen3", starts_inside=False),
    "qwen3-thinking": _think("qwen3-thinking", starts_inside=True),
    "glm45": _think("glm45", starts_inside=False),
    "kimi": _think("kimi", starts_inside=False, start="◁think▷", end="◁/think▷", special=True),
    "gpt-oss": _GPT_OSS,
    "openai_gptoss": _GPT_OSS,  # vLLM
}

REASONING_PARSER_NAMES = tuple(REASONING_PARSERS)


def get_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        known = ", ".join(REASONING_PARSER_NAMES)
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {known}") from None
