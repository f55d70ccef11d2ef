"""Issue 18 item 3: tool_choice "required" with pydantic's `$defs` / `$ref` schemas, calls cut short
by max_tokens, and tool-call arguments streamed as the model writes them (checked at every
character boundary against the non-streamed parse)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
import xgrammar
from pydantic import BaseModel

from radixserve.gateway.api import openai_format as fmt
from radixserve.gateway.pipeline.generation import Finish
from radixserve.gateway.pipeline.tool_parsers import (
    ConstrainedStreamingParser,
    get_tool_parser,
    parse_constrained_output,
    tool_call_json_schema,
)
from tests.gateway.fakes import MESSAGES, MODEL, RunningGateway, expected_output

# ---- schemas with $defs ----


class Address(BaseModel):
    street: str
    city: str


class Person(BaseModel):
    name: str
    home: Address
    past: list[Address] = []


class Company(BaseModel):
    class_name: str


class Address2(BaseModel):  # another tool's "Address": the same name, another schema
    zip: int


class Node(BaseModel):
    label: str
    children: list["Node"] = []


def tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def address_tool() -> dict:
    schema = Address2.model_json_schema()
    schema = {
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/Address"}},
        "required": ["where"],
        "$defs": {"Address": schema},
    }
    return tool("mail", schema)


SELF_REFERRING = {  # draft-07 `definitions`, and a reference to the schema's own root
    "type": "object",
    "properties": {
        "value": {"$ref": "#/definitions/Value"},
        "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
    },
    "required": ["value", "next"],
    "definitions": {"Value": {"type": "integer"}},
}

TOOLS = [
    tool("add_person", Person.model_json_schema()),
    address_tool(),
    tool("tree", Node.model_json_schema()),
    tool("chain", SELF_REFERRING),
    tool("plain", {"type": "object", "properties": {"x": {"type": "string"}}}),
]

VALID = [
    {
        "name": "add_person",
        "parameters": {"name": "Ada", "home": {"street": "1 Way", "city": "Oslo"}, "past": []},
    },
    {"name": "mail", "parameters": {"where": {"zip": 1234}}},
    {"name": "tree", "parameters": {"label": "a", "children": [{"label": "b", "children": []}]}},
    {"name": "chain", "parameters": {"value": 1, "next": {"value": 2, "next": None}}},
]
INVALID = [
    {"name": "add_person", "parameters": {"name": "Ada", "home": {"street": "1 Way"}}},
    {"name": "mail", "parameters": {"where": {"street": "x", "city": "y"}}},
    {"name": "tree", "parameters": {"label": "a", "children": [{"children": []}]}},
    {"name": "chain", "parameters": {"value": 1, "next": {"value": "two", "next": None}}},
]


def test_required_schema_hoists_each_tools_defs_and_rewrites_refs():
    schema = tool_call_json_schema(TOOLS, "required")
    assert schema["$defs"].keys() == {"Address", "mail__Address", "Node", "Value", "parameters"}
    validator = jsonschema.Draft202012Validator(schema)
    for call in VALID:
        assert validator.is_valid([call]), call
    for call in INVALID:
        assert not validator.is_valid([call]), call
    assert validator.is_valid(VALID)
    # The tools' own schemas are left as they were.
    assert "$defs" in TOOLS[0]["function"]["parameters"]


def test_required_schema_with_defs_compiles_with_xgrammar_as_the_scheduler_does():
    schema = json.dumps(tool_call_json_schema(TOOLS, "required"))
    assert "root" in str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False))


def test_the_nesting_without_hoisting_is_what_xgrammar_refused():
    nested = {
        "type": "array",
        "items": {"anyOf": [{"properties": {"parameters": Person.model_json_schema()}}]},
    }
    with pytest.raises(RuntimeError, match=r"\$defs"):
        xgrammar.Grammar.from_json_schema(json.dumps(nested), any_whitespace=False)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "tree"}}])
def test_http_accepts_pydantic_tools_with_required_and_named_choice(choice):
    from tests.gateway.fakes import FakeBackends

    backends = FakeBackends(step_delay=0)
    gw = RunningGateway(backends)
    try:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "tools": TOOLS}
        r = httpx.post(gw.base_url + "/v1/chat/completions", json={**body, "tool_choice": choice})
        assert r.status_code == 200, r.text
        # The fake model ignores the grammar: its text begins no call, so it is content.
        choice0 = r.json()["choices"][0]
        assert choice0["message"] == {
            "role": "assistant",
            "content": expected_output(4),
            "refusal": None,
            "tool_calls": None,
            "reasoning_content": None,
            "reasoning": None,
        }
        assert choice0["finish_reason"] == "length"
    finally:
        gw.close()
        backends.stop()


# ---- calls cut short by max_tokens ----

NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    "text, tool_choice, calls",
    [
        ('{"city": "Par', NAMED, [("get_weather", '{"city": "Par')]),
        ("{", NAMED, [("get_weather", "{")]),
        (
            '[{"name": "ping", "parameters": {}}, {"name": "get_weather", "parameters": {"ci',
            "required",
            [("ping", "{}"), ("get_weather", '{"ci')],
        ),
        ('[{"name": "get_weather", "parameters": {', "required", [("get_weather", "{")]),
    ],
)
def test_a_call_cut_short_keeps_what_was_written_as_openai_does(text, tool_choice, calls):
    parsed = parse_constrained_output(text, tool_choice)
    assert parsed.content is None
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls


@pytest.mark.parametrize("text", ['[{"name": "get_wea', "[", '[{"na', "  "])
def test_output_cut_before_a_call_begins_is_content(text):
    parsed = parse_constrained_output(text, "required")
    assert parsed.content == text and parsed.tool_calls == []


def test_finish_reason_of_a_cut_call_is_length_and_of_a_whole_one_tool_calls():
    finish = Finish("length", None, 1, 1, 0)
    call = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{"}}]
    assert fmt.chat_choice(0, None, finish, None, call)["finish_reason"] == "length"
    assert fmt.chat_choice(0, None, Finish("stop", 3, 1, 1, 0), None, call)["finish_reason"] == (
        "tool_calls"
    )
    assert fmt.chat_finish_reason("abort", True) == "abort"
    assert fmt.chat_finish_reason("stop", False) == "stop"


def test_hermes_call_cut_short_is_a_call_with_its_arguments_so_far():
    parsed = get_tool_parser("hermes").parse(
        'Sure.<tool_call>\n{"name": "f", "arguments": {"q": "ab'
    )
    assert parsed.content == "Sure."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"q": "ab')]


def test_hermes_end_tag_inside_a_string_is_text_and_outside_it_ends_the_call():
    inside = '<tool_call>{"name": "f", "arguments": {"s": "a</tool_call>b"}}</tool_call>'
    assert get_tool_parser("hermes").parse(inside).tool_calls[0].arguments == (
        '{"s": "a</tool_call>b"}'
    )
    broken = get_tool_parser("hermes").parse(
        'Try <tool_call>{"name": "f", "arguments": {</tool_call> done'
    )
    assert [(c.name, c.arguments) for c in broken.tool_calls] == [("f", "{")]
    assert broken.content == "Trydone"  # whitespace around calls is dropped, as before


# ---- arguments streamed as written, at every character boundary ----

HARD_ARGUMENTS = {
    "zone": "Europe/Zürich \U0001f600",
    "code": 'print("a } b")\n\tx = {"k": [1, 2]}',
    "n": [1, 2.5, -3, 1e21, None, True, False],
    "nested": {"empty": {}, "list": [], "back\\slash": "\\"},
}


def hermes_text(arguments: dict, ensure_ascii: bool, indent: int | None) -> str:
    call = json.dumps(
        {"name": "run", "arguments": arguments}, ensure_ascii=ensure_ascii, indent=indent
    )
    return f"Let me run it.\n<tool_call>\n{call}\n</tool_call>\n" + (
        '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
    )


def llama3_text(arguments: dict, ensure_ascii: bool, indent: int | None) -> str:
    call = json.dumps(
        {"name": "run", "parameters": arguments}, ensure_ascii=ensure_ascii, indent=indent
    )
    return "<|python_tag|>" + call + '; {"name": "ping", "parameters": {}}'


def required_text(arguments: dict, ensure_ascii: bool, indent: int | None) -> str:
    calls = [{"name": "run", "parameters": arguments}, {"name": "ping", "parameters": {}}]
    return json.dumps(calls, ensure_ascii=ensure_ascii, indent=indent)


def streamed(parser, pieces: list[str]) -> tuple[str, list[tuple[str, str]], int]:
    """(content, [(name, concatenated arguments)], how many argument deltas the first call had)."""
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls: list[list[str]] = []
    first_call_deltas = 0
    for e in (e for e in events if isinstance(e, dict)):
        if "id" in e:
            assert e["index"] == len(calls) and e["function"]["arguments"] == ""
            calls.append([e["function"]["name"], ""])
        else:
            assert e["index"] == len(calls) - 1
            calls[-1][1] += e["function"]["arguments"]
            first_call_deltas += e["index"] == 0
    return content, [tuple(c) for c in calls], first_call_deltas


FORMATS = {
    "hermes": (hermes_text, lambda: get_tool_parser("hermes").streaming(), "Let me run it."),
    "llama3": (llama3_text, lambda: get_tool_parser("llama3").streaming(), ""),
    "required": (required_text, lambda: ConstrainedStreamingParser("required"), ""),
}


@pytest.mark.parametrize("ensure_ascii", [False, True])
@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("form", sorted(FORMATS))
def test_streamed_arguments_equal_the_parse_at_every_character_boundary(form, indent, ensure_ascii):
    make_text, new_parser, content = FORMATS[form]
    text = make_text(HARD_ARGUMENTS, ensure_ascii, indent)
    expected = [("run", json.dumps(HARD_ARGUMENTS, ensure_ascii=False)), ("ping", "{}")]
    whole = new_parser()
    if form == "required":
        parsed = parse_constrained_output(text, "required")
    else:
        parsed = get_tool_parser(form).parse(text)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == expected
    assert (parsed.content or "") == content
    assert streamed(whole, [text])[:2] == (content, expected)
    for cut in range(len(text) + 1):
        assert streamed(new_parser(), [text[:cut], text[cut:]])[:2] == (content, expected), cut
    got_content, calls, deltas = streamed(new_parser(), list(text))
    assert (got_content, calls) == (content, expected)
    assert deltas > 20  # incremental: the arguments come as they are written, not in one piece


def test_named_choice_streams_the_arguments_at_every_character_boundary():
    text = json.dumps(HARD_ARGUMENTS, indent=1)
    expected = [("get_weather", json.dumps(HARD_ARGUMENTS, ensure_ascii=False))]
    for cut in range(len(text) + 1):
        assert streamed(ConstrainedStreamingParser(NAMED), [text[:cut], text[cut:]])[:2] == (
            "",
            expected,
        )
    content, calls, deltas = streamed(ConstrainedStreamingParser(NAMED), list(text))
    assert calls == expected and deltas > 20


@pytest.mark.parametrize("form", ["hermes", "llama3"])
def test_cut_short_text_streams_as_it_parses_at_every_boundary(form):
    make_text, new_parser, _ = FORMATS[form]
    full = make_text({"q": 'a "}" \u00e9', "n": [1, 2.5]}, True, None)
    for end in [*range(0, len(full), 3), len(full) - 1]:  # where max_tokens cut it
        text = full[:end]
        parsed = get_tool_parser(form).parse(text)
        want = (parsed.content or "", [(c.name, c.arguments) for c in parsed.tool_calls])
        for cut in range(len(text) + 1):
            assert streamed(new_parser(), [text[:cut], text[cut:]])[:2] == want, (end, cut)
