"""Request validation for `tools` / `tool_choice`, the JSON schema that forces tool calls,
and turning output generated under that schema back into tool calls."""

from __future__ import annotations

from typing import Any

from radixserve.gateway.api.errors import bad_request
from radixserve.gateway.pipeline.tool_parsers.arguments import (
    MORE,
    YES,
    ArgumentsWriter,
    match_call_header,
)
from radixserve.gateway.pipeline.text_markers import PhaseScanner
from radixserve.gateway.pipeline.tool_parsers.calls import ParsedOutput
from radixserve.gateway.pipeline.tool_parsers.streaming import (
    ArgumentsText,
    CallEnd,
    CallStart,
    Segment,
    StreamingToolParser,
)

_MODES = ("none", "auto", "required")
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_ARGUMENT_KEYS = ("parameters",)  # the key tool_call_json_schema gives a call's arguments


def validate_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of function tools", param="tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(
                f"{where} must be an object with type 'function'", param=f"{where}.type"
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"{where}.function must be an object", param=f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(
                f"{where}.function.name must be a non-empty string", param=f"{where}.function.name"
            )
        if name in names:
            raise bad_request(
                f"function name {name!r} is given twice", param=f"{where}.function.name"
            )
        names.add(name)
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise bad_request(
                f"{where}.function.parameters must be a JSON schema object",
                param=f"{where}.function.parameters",
            )
        if "description" in function and not isinstance(function["description"], str):
            raise bad_request(
                f"{where}.function.description must be a string",
                param=f"{where}.function.description",
            )


def resolve_tool_choice(tools: Any, tool_choice: Any) -> str | dict:
    """Validate both fields; return the effective choice: "none", "auto", "required" or the named-function dict.

    An empty `tools` list counts as no tools."""
    validate_tools(tools)
    if tool_choice is None:
        return "auto" if tools else "none"
    if not tools:
        raise bad_request(
            "tool_choice is only allowed when tools are specified", param="tool_choice"
        )
    if isinstance(tool_choice, str):
        if tool_choice not in _MODES:
            raise bad_request(
                f"tool_choice must be one of {', '.join(_MODES)} or a named function",
                param="tool_choice",
            )
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (
        not isinstance(function, dict)
        or tool_choice.get("type") != "function"
        or not isinstance(function.get("name"), str)
    ):
        raise bad_request(
            'a named tool_choice must be {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if function["name"] not in {tool["function"]["name"] for tool in tools}:
        raise bad_request(
            f"tool_choice names function {function['name']!r}, which is not among the tools",
            param="tool_choice",
        )
    return tool_choice


def named_function(tool_choice: str | dict) -> str | None:
    """The function a resolved choice forces, or None when it names none."""
    return tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None


def tool_call_json_schema(tools: Any, tool_choice: Any) -> dict | None:
    """The schema generation must follow: for "required" an array of {"name", "parameters"} calls,
    for a named function that function's arguments object; None when generation is free."""
    choice = resolve_tool_choice(tools, tool_choice)
    name = named_function(choice)
    if name is not None:
        return _parameters_schema(next(tool for tool in tools if tool["function"]["name"] == name))
    if choice != "required":
        return None
    defs: dict[str, Any] = {}
    calls = [_call_schema(tool["function"]["name"], _hoisted(tool, defs)) for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if defs:
        schema["$defs"] = defs
    return schema


def _parameters_schema(tool: dict) -> dict:
    return tool["function"].get("parameters") or _NO_PARAMETERS


def _call_schema(name: str, parameters: dict) -> dict:
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": [name]},
            "parameters": parameters,
        },
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


_DEFS_KEYS = ("$defs", "definitions")  # JSON Schema's, and draft-07's (pydantic v1) name


def _hoisted(tool: dict, defs: dict[str, Any]) -> dict:
    """A tool's parameters schema made to sit inside the combined one: its `$defs` (and
    `definitions`) moved into the root's `defs`, renamed where another tool took the name, and
    every `$ref` into them rewritten; a schema that refers to itself (`#`, `#/properties/...`)
    moves into `defs` whole, so its references keep their target."""
    parameters = _parameters_schema(tool)
    own = {key: value for key, value in parameters.items() if key not in _DEFS_KEYS}
    targets: dict[str, str] = {}  # the old pointer of each definition -> its new one
    for key in _DEFS_KEYS:
        for name in parameters.get(key) or {}:
            new = _free_name(name, tool["function"]["name"], defs)
            defs[new] = None  # taken
            targets[f"#/{key}/{_pointer_escape(name)}"] = f"#/$defs/{_pointer_escape(new)}"
    self_name = None
    if _refers_to_root(parameters, targets):
        self_name = _free_name("parameters", tool["function"]["name"], defs)
        defs[self_name] = None
        targets["#"] = f"#/$defs/{_pointer_escape(self_name)}"
    for key in _DEFS_KEYS:
        for name, definition in (parameters.get(key) or {}).items():
            new = targets[f"#/{key}/{_pointer_escape(name)}"].removeprefix("#/$defs/")
            defs[_pointer_unescape(new)] = _rewrite_refs(definition, targets)
    own = _rewrite_refs(own, targets)
    if self_name is None:
        return own
    defs[self_name] = own
    return {"$ref": targets["#"]}


def _free_name(name: str, tool_name: str, defs: dict) -> str:
    if name not in defs:
        return name
    candidate, n = f"{tool_name}__{name}", 2
    while candidate in defs:
        candidate, n = f"{tool_name}__{name}_{n}", n + 1
    return candidate


def _target(ref: str, targets: dict[str, str]) -> str | None:
    """The rewritten ref, when it points into one of `targets` (or below it)."""
    for old in sorted(targets, key=len, reverse=True):
        if old == "#" and ref.startswith("#"):
            return targets[old] + ref[1:]
        if ref == old or ref.startswith(old + "/"):
            return targets[old] + ref[len(old) :]
    return None


def _refers_to_root(node: Any, targets: dict[str, str]) -> bool:
    """Whether a `$ref` in node points into the schema itself, not into its definitions."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and _target(ref, targets) is None:
            return True
        return any(_refers_to_root(value, targets) for value in node.values())
    if isinstance(node, list):
        return any(_refers_to_root(value, targets) for value in node)
    return False


def _rewrite_refs(node: Any, targets: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {key: _rewrite_refs(value, targets) for key, value in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str) and (target := _target(ref, targets)) is not None:
            out["$ref"] = target
        return out
    if isinstance(node, list):
        return [_rewrite_refs(value, targets) for value in node]
    return node


def _pointer_escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _pointer_unescape(name: str) -> str:
    return name.replace("~1", "/").replace("~0", "~")


def parse_constrained_output(text: str, tool_choice: str | dict) -> ParsedOutput:
    """Tool calls from output generated under tool_call_json_schema, as OpenAI returns them: a call
    cut short by max_tokens keeps the arguments written so far; output with no call begun (e.g.
    cut before a name) comes back as content."""
    return ConstrainedStreamingParser(tool_choice).parse(text)


class ConstrainedStreamingParser(StreamingToolParser):
    """StreamingToolParser over output generated under tool_call_json_schema."""

    def __init__(self, tool_choice: str | dict):
        name = named_function(tool_choice)
        if name is not None:
            super().__init__(NamedCallScanner(name))
        elif tool_choice == "required":
            super().__init__(RequiredCallsScanner())
        else:
            raise ValueError(f"tool_choice {tool_choice!r} does not constrain the output")

    def parse(self, text: str) -> ParsedOutput:
        events = self.feed(text) + self.finish()
        content = "".join(event for event in events if isinstance(event, str))
        return ParsedOutput(
            content=None if self.tool_calls and not content else content,
            tool_calls=self.tool_calls,
        )


class _ConstrainedScanner(PhaseScanner):
    """Output that is a call's arguments object, or a list of calls: streamed as written; until a
    call begins, held, and content if none does."""

    def __init__(self):
        self._phase = self._opening
        self._writer: ArgumentsWriter | None = None

    def _opening(self, text: str, final: bool, segments: list[Segment]) -> str:
        raise NotImplementedError

    def _not_a_call(self, text: str, final: bool, segments: list[Segment]) -> str:
        segments.append(text)
        return ""

    def _hold_or_content(self, text: str, final: bool) -> str:
        if final:
            self._phase = self._not_a_call
        return text

    def _start(self, name: str, text: str, brace: int, segments: list[Segment]) -> str:
        segments.append(CallStart(name))
        self._writer = ArgumentsWriter()
        self._phase = self._arguments
        return text[brace:]

    def _arguments(self, text: str, final: bool, segments: list[Segment]) -> str:
        _, closed = self._writer.feed(text)
        if closed is None:
            segments.append(ArgumentsText(text))
            if final:
                segments.append(CallEnd())
            return ""
        segments += [ArgumentsText(text[:closed]), CallEnd()]
        self._after_call()
        return text[closed:]

    def _after_call(self) -> None:
        self._phase = self._ignored

    def _ignored(self, text: str, final: bool, segments: list[Segment]) -> str:
        return ""


class NamedCallScanner(_ConstrainedScanner):
    def __init__(self, name: str):
        super().__init__()
        self._name = name

    def _opening(self, text: str, final: bool, segments: list[Segment]) -> str:
        stripped = text.lstrip()
        if not stripped:
            return self._hold_or_content(text, final)
        if not stripped.startswith("{"):
            self._phase = self._not_a_call
            return text
        return self._start(self._name, text, len(text) - len(stripped), segments)


class RequiredCallsScanner(_ConstrainedScanner):
    def _opening(self, text: str, final: bool, segments: list[Segment]) -> str:
        stripped = text.lstrip()
        if not stripped:
            return self._hold_or_content(text, final)
        if not stripped.startswith("["):
            self._phase = self._not_a_call
            return text
        at = len(text) - len(stripped) + 1
        status, name, brace = match_call_header(text, at, _ARGUMENT_KEYS)
        if status == YES:
            return self._start(name, text, brace, segments)
        if status == MORE:
            return self._hold_or_content(text, final)
        self._phase = self._not_a_call
        return text

    def _after_call(self) -> None:
        self._writer = ArgumentsWriter()
        self._writer.depth = 1  # what is left of the call's own object, dropped
        self._phase = self._rest_of_call

    def _rest_of_call(self, text: str, final: bool, segments: list[Segment]) -> str:
        _, closed = self._writer.feed(text)
        if closed is None:
            return ""
        self._phase = self._between
        return text[closed:]

    def _between(self, text: str, final: bool, segments: list[Segment]) -> str:
        at = 0
        while at < len(text) and (text[at] in " \t\r\n,"):
            at += 1
        status, name, brace = match_call_header(text, at, _ARGUMENT_KEYS)
        if status == YES:
            return self._start(name, text, brace, segments)
        if status == MORE and not final:
            return text[at:]
        self._phase = self._ignored  # "]", or what the schema would not let through
        return ""
