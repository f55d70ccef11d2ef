"""Pythonic calls (Llama 3.2 / Llama 4 and others): the whole output is a Python list of calls,
`[f(a=1, b="x"), g()]`, maybe inside `<|python_start|>` ... `<|python_end|>`. Read with `ast`,
never run. Output that could still become such a list is held until the end."""

from __future__ import annotations

import ast
import re
from typing import Any

from radixserve.gateway.pipeline.tool_parsers.calls import ToolCall, serialise_arguments
from radixserve.gateway.pipeline.tool_parsers.streaming import Segment

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
# A list of calls so far: `[`, then nothing, `]`, or a (dotted) name, maybe with its `(`.
_MAY_BE_CALLS = re.compile(r"\[\s*(?:\]|[A-Za-z_][\w.]*\s*(?:\(|$)|$)", re.DOTALL)
_JSON_NAMES = {"true": True, "false": False, "null": None}


class PythonicScanner:
    def __init__(self):
        self._content = False  # the output turned out not to be a list of calls

    def scan(self, text: str, final: bool) -> tuple[list[Segment], str]:
        if self._content:
            return [text], ""
        body = _unwrapped(text.strip())
        if final:
            calls = parse_pythonic_calls(body)
            return (calls, "") if calls is not None else ([text], "")
        if PYTHON_START.startswith(body) or _MAY_BE_CALLS.match(body):
            return [], text
        self._content = True
        return [text], ""


def _unwrapped(text: str) -> str:
    text = text.removeprefix(PYTHON_START).lstrip()
    return text.removesuffix(PYTHON_END).rstrip()


def parse_pythonic_calls(text: str) -> list[ToolCall] | None:
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted_name(node.func)
        if name is None or any(keyword.arg is None for keyword in node.keywords):
            return None
        try:
            arguments = {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None
        calls.append(ToolCall(name=name, arguments=serialise_arguments(arguments)))
    return calls


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    return ast.literal_eval(node)
