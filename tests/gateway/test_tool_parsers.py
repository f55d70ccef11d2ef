"""Tool-call parsing: formats, streaming vs non-streaming, tool_choice validation and constrained output."""

import json
import random
import re

import pytest

from radixserve.gateway.api.errors import ApiError
from radixserve.gateway.pipeline.tool_parsers import (
    ConstrainedStreamingParser,
    default_tool_parser_name,
    get_tool_parser,
    parse_constrained_output,
    resolve_tool_choice,
    tool_call_json_schema,
)

WEATHER_ARGS = {"city": "Paris", "unit": "celsius"}
TIME_ARGS = {
    "zone": "Europe/Zürich",
    "nested": {"list": [1, 2.5, None, True], "text": 'a } brace " quote'},
}


def hermes_block(name, arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def llama_call(name, parameters, key="parameters"):
    return json.dumps({"name": name, key: parameters})


# (parser name, model output, expected content, expected [(name, arguments object)])
CASES = {
    "hermes single": (
        "hermes",
        hermes_block("get_weather", WEATHER_ARGS),
        None,
        [("get_weather", WEATHER_ARGS)],
    ),
    "hermes content then calls": (
        "hermes",
        "Let me check both.\n\n"
        + hermes_block("get_weather", WEATHER_ARGS)
        + "\n"
        + hermes_block("get_time", TIME_ARGS)
        + "\n",
        "Let me check both.",
        [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)],
    ),
    "hermes arguments as a JSON string": (
        "hermes",
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>',
        None,
        [("f", {"x": 1})],
    ),
    "hermes no arguments": (
        "hermes",
        '<tool_call>{"name": "ping"}</tool_call>',
        None,
        [("ping", {})],
    ),
    "hermes plain text": (
        "hermes",
        "Just an answer, with a < sign and <tool> tag.\n",
        "Just an answer, with a < sign and <tool> tag.\n",
        [],
    ),
    "hermes invalid JSON stays content": (
        "hermes",
        'Try <tool_call>{"name": f, "arguments": {}}</tool_call> done',
        'Try <tool_call>{"name": f, "arguments": {}}</tool_call> done',
        [],
    ),
    "hermes JSON that is not a call stays content": (
        "hermes",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        [],
    ),
    "hermes unclosed last call": (
        "hermes",
        'ok <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n',
        "ok",
        [("f", {"a": 1})],
    ),
    "hermes unclosed invalid block stays content": (
        "hermes",
        "see <tool_call> here",
        "see <tool_call> here",
        [],
    ),
    "hermes text after a call": (
        "hermes",
        hermes_block("f", {}) + "\n\nDone.",
        "Done.",
        [("f", {})],
    ),
    "hermes partial marker at the end": ("hermes", "the end <tool_ca", "the end <tool_ca", []),
    "llama3 bare call": (
        "llama3",
        llama_call("get_weather", WEATHER_ARGS),
        None,
        [("get_weather", WEATHER_ARGS)],
    ),
    "llama3 python tag and arguments key": (
        "llama3",
        "<|python_tag|>" + llama_call("get_time", TIME_ARGS, key="arguments"),
        None,
        [("get_time", TIME_ARGS)],
    ),
    "llama3 several calls": (
        "llama3",
        " "
        + llama_call("get_weather", WEATHER_ARGS)
        + "; "
        + llama_call("get_time", TIME_ARGS)
        + ";\n",
        None,
        [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)],
    ),
    "llama3 content before the python tag": (
        "llama3",
        "Checking.\n<|python_tag|>" + llama_call("f", {"q": "x"}),
        "Checking.",
        [("f", {"q": "x"})],
    ),
    "llama3 call then text": (
        "llama3",
        llama_call("f", {}) + "\nHope that helps.",
        "Hope that helps.",
        [("f", {})],
    ),
    "llama3 plain text with braces": (
        "llama3",
        "Use {x} in the template.",
        "Use {x} in the template.",
        [],
    ),
    "llama3 invalid JSON stays content": (
        "llama3",
        '{"name": f, "parameters": {}}',
        '{"name": f, "parameters": {}}',
        [],
    ),
    "llama3 JSON that is not a call stays content": (
        "llama3",
        '{"answer": 42}',
        '{"answer": 42}',
        [],
    ),
    "llama3 lone python tag stays content": ("llama3", "<|python_tag|>", "<|python_tag|>", []),
    "llama3 partial python tag at the start": ("llama3", "<|pyth", "<|pyth", []),
}


def calls_of(parsed_calls):
    return [(call.name, json.loads(call.arguments)) for call in parsed_calls]


def run_stream(parser_name, chunks):
    """Feed the chunks; return (content, [(name, arguments object)], tool-call deltas), checking delta shapes."""
    stream = get_tool_parser(parser_name).streaming()
    events = [event for chunk in chunks for event in stream.feed(chunk)] + stream.finish()
    content = "".join(event for event in events if isinstance(event, str))
    deltas = [event for event in events if isinstance(event, dict)]
    calls: dict[int, dict] = {}
    for delta in deltas:
        index = delta["index"]
        if index not in calls:
            assert index == len(calls)
            assert delta["id"].startswith("call_") and delta["type"] == "function"
            assert delta["function"]["name"] and delta["function"]["arguments"] == ""
            calls[index] = {"name": delta["function"]["name"], "arguments": ""}
        else:
            assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
            calls[index]["arguments"] += delta["function"]["arguments"]
    streamed = [(call["name"], json.loads(call["arguments"])) for call in calls.values()]
    assert streamed == calls_of(stream.tool_calls)
    return content, streamed, deltas


def splittings(text, seed=0):
    yield [text]
    yield list(text)
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    rng = random.Random(seed)
    for _ in range(20):
        cuts = (
            sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
            if len(text) > 1
            else []
        )
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("case", CASES)
def test_parse(case):
    parser_name, text, content, calls = CASES[case]
    parsed = get_tool_parser(parser_name).parse(text)
    assert parsed.content == content
    assert calls_of(parsed.tool_calls) == calls
    for call in parsed.tool_calls:
        assert call.type == "function"
        assert call.arguments == json.dumps(json.loads(call.arguments), ensure_ascii=False)


@pytest.mark.parametrize("case", CASES)
def test_streaming_matches_parse_at_any_split(case):
    parser_name, text, content, calls = CASES[case]
    for chunks in splittings(text):
        streamed_content, streamed_calls, _ = run_stream(parser_name, chunks)
        assert (streamed_content or None if calls else streamed_content) == content, chunks
        assert streamed_calls == calls, chunks


def test_call_ids_look_like_openai_and_differ():
    text = hermes_block("a", {}) + hermes_block("b", {})
    ids = [call.id for call in get_tool_parser("hermes").parse(text).tool_calls]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", call_id) for call_id in ids)
    assert len(set(ids)) == 2


def test_arguments_keep_non_ascii_text():
    parsed = get_tool_parser("hermes").parse(hermes_block("f", {"city": "Zürich"}))
    assert parsed.tool_calls[0].arguments == '{"city": "Zürich"}'


def test_content_streams_before_a_call_and_the_arguments_as_they_are_written():
    stream = get_tool_parser("hermes").streaming()
    assert stream.feed("Sure, checking") == ["Sure, checking"]
    assert stream.feed(" now. <tool_") == [" now."]
    assert stream.feed('call>{"name": "f", "argum') == []
    assert stream.feed('ents": ') == []  # the call begins with its arguments' brace
    start, arguments = stream.feed('{"a": ')
    assert start["index"] == 0 and start["function"] == {"name": "f", "arguments": ""}
    assert arguments == {"index": 0, "function": {"arguments": '{"a": '}}
    assert stream.feed("1}") == [{"index": 0, "function": {"arguments": "1}"}}]
    assert stream.feed("}</tool_call>") == []
    assert stream.finish() == []
    assert stream.tool_calls[0].arguments == '{"a": 1}'


@pytest.mark.parametrize(
    "parser_name, held, continuation",
    [
        ("hermes", "<tool_c", "ar is red"),
        ("hermes", "<", " 3"),
        ("llama3", "<|python_t", "ag is not here"),
    ],
)
def test_partial_marker_is_held_then_released_as_content(parser_name, held, continuation):
    stream = get_tool_parser(parser_name).streaming()
    assert stream.feed("x " + held) == ["x"]
    released = stream.feed(continuation) + stream.finish()
    assert "".join(released) == " " + held + continuation
    assert stream.tool_calls == []


def test_llama3_call_streams_its_parameters_as_they_are_written():
    stream = get_tool_parser("llama3").streaming()
    start, first = stream.feed('{"name": "f", "parameters": {"a": {"b": 1')
    assert start["function"] == {"name": "f", "arguments": ""}
    assert first == {"index": 0, "function": {"arguments": '{"a": {"b": '}}  # 1 may go on: 10
    assert stream.feed("}") == [{"index": 0, "function": {"arguments": "1}"}}]
    assert stream.feed("}}") == [{"index": 0, "function": {"arguments": "}"}}]
    assert stream.finish() == [] and stream.tool_calls[0].arguments == '{"a": {"b": 1}}'


def test_parser_registry_and_defaults():
    assert get_tool_parser("qwen25") is get_tool_parser("hermes") is get_tool_parser("qwen")
    assert get_tool_parser("llama3").name == "llama3"
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")
    assert default_tool_parser_name("Qwen2ForCausalLM") == "hermes"
    assert default_tool_parser_name("Qwen3ForCausalLM") == "hermes"
    assert default_tool_parser_name("LlamaForCausalLM") == "llama3"
    assert (
        default_tool_parser_name("LlamaForCausalLM", "NousResearch/Hermes-3-Llama-3.1-8B")
        == "hermes"
    )
    assert default_tool_parser_name(None, "meta-llama/Llama-3.2-1B-Instruct") == "llama3"
    assert default_tool_parser_name("GPT2LMHeadModel", "gpt2") is None
    assert default_tool_parser_name() is None


# ---- tools / tool_choice ----

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
PING_TOOL = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER_TOOL, PING_TOOL]
NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    "tools, tool_choice, expected",
    [
        (None, None, "none"),
        ([], None, "none"),
        (TOOLS, None, "auto"),
        (TOOLS, "none", "none"),
        (TOOLS, "required", "required"),
        (TOOLS, NAMED_WEATHER, NAMED_WEATHER),
    ],
)
def test_resolve_tool_choice(tools, tool_choice, expected):
    assert resolve_tool_choice(tools, tool_choice) == expected


@pytest.mark.parametrize(
    "tools, tool_choice, param",
    [
        (None, "auto", "tool_choice"),
        ([], "required", "tool_choice"),
        (None, NAMED_WEATHER, "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
        (TOOLS, {"type": "function"}, "tool_choice"),
        (TOOLS, {"type": "other", "function": {"name": "ping"}}, "tool_choice"),
        (TOOLS, 3, "tool_choice"),
        ({"type": "function"}, None, "tools"),
        ([{"type": "retrieval"}], None, "tools[0].type"),
        ([PING_TOOL, "ping"], None, "tools[1].type"),
        ([{"type": "function"}], None, "tools[0].function"),
        ([{"type": "function", "function": {"name": ""}}], None, "tools[0].function.name"),
        ([PING_TOOL, PING_TOOL], None, "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
            None,
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "description": 1}}],
            None,
            "tools[0].function.description",
        ),
    ],
)
def test_invalid_tools_or_tool_choice_is_a_400(tools, tool_choice, param):
    with pytest.raises(ApiError) as raised:
        resolve_tool_choice(tools, tool_choice)
    assert raised.value.status == 400 and raised.value.param == param


def test_no_schema_when_generation_is_free():
    assert tool_call_json_schema(TOOLS, None) is None
    assert tool_call_json_schema(TOOLS, "auto") is None
    assert tool_call_json_schema(TOOLS, "none") is None
    assert tool_call_json_schema(None, None) is None


@pytest.mark.parametrize(
    "output, valid",
    [
        ([{"name": "get_weather", "parameters": {"city": "Paris"}}], True),
        (
            [
                {"name": "ping", "parameters": {}},
                {"name": "get_weather", "parameters": {"city": "Rome"}},
            ],
            True,
        ),
        ([], False),
        ([{"name": "get_weather", "parameters": {}}], False),
        ([{"name": "get_weather", "parameters": {"city": 3}}], False),
        (
            [
                {"name": "ping", "parameters": {"city": "Paris"}},
            ],
            False,
        ),
        ([{"name": "unknown", "parameters": {}}], False),
        ([{"name": "ping"}], False),
        ({"name": "ping", "parameters": {}}, False),
    ],
)
def test_required_schema(output, valid):
    import jsonschema

    schema = tool_call_json_schema(TOOLS, "required")
    assert jsonschema.Draft202012Validator(schema).is_valid(output) is valid


@pytest.mark.parametrize(
    "output, valid",
    [
        ({"city": "Paris"}, True),
        ({}, False),
        ({"city": "Paris", "x": 1}, False),
        ([{"city": "Paris"}], False),
    ],
)
def test_named_schema_is_the_functions_parameters(output, valid):
    import jsonschema

    schema = tool_call_json_schema(TOOLS, NAMED_WEATHER)
    assert schema == WEATHER_TOOL["function"]["parameters"]
    assert jsonschema.Draft202012Validator(schema).is_valid(output) is valid


def test_named_schema_for_a_function_without_parameters_is_an_empty_object():
    import jsonschema

    schema = tool_call_json_schema(TOOLS, {"type": "function", "function": {"name": "ping"}})
    assert jsonschema.Draft202012Validator(schema).is_valid({})
    assert not jsonschema.Draft202012Validator(schema).is_valid([])


@pytest.mark.parametrize("tool_choice", ["required", NAMED_WEATHER])
def test_schemas_compile_with_xgrammar(tool_choice):
    import xgrammar

    assert "root" in str(
        xgrammar.Grammar.from_json_schema(json.dumps(tool_call_json_schema(TOOLS, tool_choice)))
    )


def test_constrained_required_output_to_tool_calls():
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "ping", "parameters": {}}]'
    parsed = parse_constrained_output(text, "required")
    assert parsed.content is None
    assert calls_of(parsed.tool_calls) == [("get_weather", {"city": "Paris"}), ("ping", {})]


def test_constrained_named_output_to_tool_call():
    parsed = parse_constrained_output('{ "city" : "Zürich" }', NAMED_WEATHER)
    assert parsed.content is None
    assert [(call.name, call.arguments) for call in parsed.tool_calls] == [
        ("get_weather", '{"city": "Zürich"}')
    ]


@pytest.mark.parametrize(
    "text, tool_choice",
    [
        ('[{"name": "get_weat', "required"),
        ("[]", "required"),
        ('[{"parameters": {}}]', "required"),
        ('["Paris"]', NAMED_WEATHER),
    ],
)
def test_constrained_output_that_does_not_decode_is_content(text, tool_choice):
    parsed = parse_constrained_output(text, tool_choice)
    assert parsed.content == text and parsed.tool_calls == []


def test_constrained_output_needs_a_constraining_choice():
    with pytest.raises(ValueError):
        parse_constrained_output("{}", "auto")


def test_constrained_streaming_streams_each_call_as_it_is_written():
    stream = ConstrainedStreamingParser("required")
    text = '[{"name": "ping", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    events = [e for i in range(0, len(text), 7) for e in stream.feed(text[i : i + 7])]
    assert stream.finish() == []
    assert [(e["index"], e.get("id") is not None) for e in events] == [
        (0, True),
        (0, False),
        (1, True),
        *[(1, False)] * 3,
    ]
    assert events[2]["function"]["name"] == "get_weather"
    assert "".join(e["function"]["arguments"] for e in events[3:]) == '{"city": "Oslo"}'
    assert [call.name for call in stream.tool_calls] == ["ping", "get_weather"]
