"""Tool-call parsers by --tool-call-parser name (SGLang's names, and vLLM's where they differ), and a
default guessed from the model."""

from __future__ import annotations

from radixserve.gateway.pipeline.tool_parsers.deepseekv3 import deepseekv3_scanner
from radixserve.gateway.pipeline.tool_parsers.gpt_oss import GptOssToolScanner
from radixserve.gateway.pipeline.tool_parsers.hermes import HermesScanner
from radixserve.gateway.pipeline.tool_parsers.kimi_k2 import kimi_k2_scanner
from radixserve.gateway.pipeline.tool_parsers.llama3 import Llama3Scanner
from radixserve.gateway.pipeline.tool_parsers.mistral import MistralScanner
from radixserve.gateway.pipeline.tool_parsers.pythonic import PythonicScanner
from radixserve.gateway.pipeline.tool_parsers.qwen3_coder import qwen3_coder_scanner
from radixserve.gateway.pipeline.tool_parsers.streaming import ToolParser

_HERMES = ToolParser("hermes", lambda tools: HermesScanner())
_LLAMA3 = ToolParser("llama3", lambda tools: Llama3Scanner())
_QWEN3_CODER = ToolParser("qwen3_coder", qwen3_coder_scanner)
_DEEPSEEKV3 = ToolParser("deepseekv3", deepseekv3_scanner)
_KIMI_K2 = ToolParser("kimi_k2", kimi_k2_scanner, needs_special_tokens=True)
_GPT_OSS = ToolParser("gpt-oss", lambda tools: GptOssToolScanner(), needs_special_tokens=True)

TOOL_PARSERS: dict[str, ToolParser] = {
    "hermes": _HERMES,
    "qwen25": _HERMES,
    "qwen": _HERMES,
    "llama3": _LLAMA3,
    "qwen3_coder": _QWEN3_CODER,
    "mistral": ToolParser("mistral", lambda tools: MistralScanner(), needs_special_tokens=True),
    "deepseekv3": _DEEPSEEKV3,
    "deepseek_v3": _DEEPSEEKV3,  # vLLM
    "deepseekv31": _DEEPSEEKV3,  # the V3.1 layout is read by the same parser
    "pythonic": ToolParser("pythonic", lambda tools: PythonicScanner()),
    "kimi_k2": _KIMI_K2,
    "gpt-oss": _GPT_OSS,
    "openai": _GPT_OSS,  # vLLM
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
