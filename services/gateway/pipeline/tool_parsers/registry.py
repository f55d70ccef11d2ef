"""Tool-call parsers by --tool-call-parser name, and a default guessed from the model."""

from __future__ import annotations

from radixserve.gateway.pipeline.tool_parsers.hermes import HermesScanner
from radixserve.gateway.pipeline.tool_parsers.llama3 import Llama3Scanner
from radixserve.gateway.pipeline.tool_parsers.streaming import ToolParser

_HERMES = ToolParser("hermes", HermesScanner)
_LLAMA3 = ToolParser("llama3", Llama3Scanner)

TOOL_PARSERS: dict[str, ToolParser] = {
    "hermes": _HERMES,
    "qwen25": _HERMES,
    "qwen": _HERMES,
    "llama3": _LLAMA3,
}

_BY_ARCHITECTURE = {
    "Qwen2ForCausalLM": "hermes",
    "Qwen2MoeForCausalLM": "hermes",
    "Qwen3ForCausalLM": "hermes",
    "Qwen3MoeForCausalLM": "hermes",
    "LlamaForCausalLM": "llama3",
}

# Checked before the architecture: Hermes fine-tunes of Llama speak the Hermes format.
_BY_MODEL_NAME_PART = (
    ("hermes", "hermes"),
    ("qwen", "hermes"),
    ("llama-3", "llama3"),
    ("llama3", "llama3"),
    ("llama_3", "llama3"),
)


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {known}") from None


def default_tool_parser_name(
    architecture: str | None = None, model_name: str | None = None
) -> str | None:
    lowered = (model_name or "").lower()
    for part, parser_name in _BY_MODEL_NAME_PART:
        if part in lowered:
            return parser_name
    return _BY_ARCHITECTURE.get(architecture or "")
