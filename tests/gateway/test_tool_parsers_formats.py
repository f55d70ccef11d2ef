"""The tool-call formats beside hermes and llama3 (qwen3_coder, mistral, deepseekv3, pythonic, kimi_k2,
gpt-oss): whole parses, streams cut at every character equal to them, and malformed calls as content."""

import dataclasses
import json
import random

import pytest

from radixserve.common.args import ServerArgs
from radixserve.gateway.pipeline.reasoning_parsers import (
    REASONING_PARSER_NAMES,
    get_reasoning_parser,
)
from radixserve.gateway.pipeline.tool_parsers import TOOL_PARSERS, get_tool_parser

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "scale": {"type": "number"},
                    "hourly": {"type": "boolean"},
                    "fields": {"type": "array"},
                    "where": {"type": "object"},
                    "note": {"type": ["string", "null"]},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},
]
ARGS = {"city": "Zürich", "days": 3}
NESTED = {"q": 'a } brace " quote [TOOL_CALLS] <tool_call>', "n": [1, 2.5, None, True]}

DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
KIMI_BEGIN, KIMI_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"


def ds_call(name, args):
    return f"{DS_CALL}function{DS_SEP}{name}\n```json\n{json.dumps(args)}\n```{DS_CALL_END}"


def kimi_call(name, index, args):
    return (
        f"<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>"
        f"{json.dumps(args)}<|tool_call_end|>"
    )


def harmony_call(name, args, start="<|start|>assistant"):
    return (
        f"{start}<|channel|>commentary to=functions.{name} <|constrain|>json"
        f"<|message|>{json.dumps(args)}<|call|>"
    )


QWEN3_CODER_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n<parameter=scale>\n1.5\n</parameter>\n"
    '<parameter=hourly>\ntrue\n</parameter>\n<parameter=fields>\n["temp", "wind"]\n</parameter>\n'
    '<parameter=where>\n{"lat": 47}\n</parameter>\n<parameter=note>\nnull\n</parameter>\n'
    "<parameter=extra>\n42\n</parameter>\n</function>\n</tool_call>"
)
QWEN3_CODER_ARGS = {
    "city": "Zürich",
    "days": 3,
    "scale": 1.5,
    "hourly": True,
    "fields": ["temp", "wind"],
    "where": {"lat": 47},
    "note": None,
    "extra": 42,  # not in the schema: read as JSON
}

# (parser, model output, expected content, expected [(name, arguments)])
CASES = {
    "qwen3_coder typed by the schema": (
        "qwen3_coder",
        "Checking.\n" + QWEN3_CODER_CALL,
        "Checking.",
        [("get_weather", QWEN3_CODER_ARGS)],
    ),
    "qwen3_coder two calls, string kept verbatim": (
        "qwen3_coder",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\n 42 \n</parameter>\n</function>\n"
        "</tool_call>\n<tool_call>\n<function=ping>\n</function>\n</tool_call>",
        None,
        [("get_weather", {"city": " 42 "}), ("ping", {})],
    ),
    "qwen3_coder unterminated call is content": (
        "qwen3_coder",
        "x <tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        "x <tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        [],
    ),
    "mistral JSON array": (
        "mistral",
        "[TOOL_CALLS] "
        + json.dumps(
            [{"name": "get_weather", "arguments": ARGS}, {"name": "f", "arguments": NESTED}]
        ),
        None,
        [("get_weather", ARGS), ("f", NESTED)],
    ),
    "mistral name[ARGS] form, twice, after content": (
        "mistral",
        "Sure.[TOOL_CALLS]get_weather[ARGS]"
        + json.dumps(ARGS)
        + "[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]"
        + json.dumps(NESTED),
        "Sure.",
        [("get_weather", ARGS), ("f", NESTED)],
    ),
    "mistral bad JSON is content": (
        "mistral",
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": }}]',
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": }}]',
        [],
    ),
    "mistral unterminated call is content": (
        "mistral",
        'a [TOOL_CALLS]f[ARGS]{"x": [1, ',
        'a [TOOL_CALLS]f[ARGS]{"x": [1, ',
        [],
    ),
    "mistral marker in prose is content": (
        "mistral",
        "use [TOOL_CALLS] like this",
        "use [TOOL_CALLS] like this",
        [],
    ),
    "deepseekv3 two calls": (
        "deepseekv3",
        "Let me look.\n"
        + DS_BEGIN
        + ds_call("get_weather", ARGS)
        + "\n"
        + ds_call("f", NESTED)
        + DS_END,
        "Let me look.",
        [("get_weather", ARGS), ("f", NESTED)],
    ),
    "deepseekv3 V3.1 layout": (
        "deepseekv3",
        f"{DS_BEGIN}{DS_CALL}get_weather{DS_SEP}{json.dumps(ARGS)}{DS_CALL_END}{DS_END}",
        None,
        [("get_weather", ARGS)],
    ),
    "deepseekv3 bad JSON is content": (
        "deepseekv3",
        f"{DS_BEGIN}{DS_CALL}function{DS_SEP}f\n```json\n{{oops\n```{DS_CALL_END}",
        f"{DS_CALL}function{DS_SEP}f\n```json\n{{oops\n```{DS_CALL_END}",
        [],
    ),
    "deepseekv3 unterminated call is content": (
        "deepseekv3",
        f"{DS_BEGIN}{DS_CALL}function{DS_SEP}f\n```json\n{{",
        f"{DS_CALL}function{DS_SEP}f\n```json\n{{",
        [],
    ),
    "pythonic calls": (
        "pythonic",
        '[get_weather(city="Zürich", days=3), f(q=\'a } brace " quote [TOOL_CALLS] <tool_call>\', '
        "n=[1, 2.5, None, True]), ping()]",
        None,
        [("get_weather", ARGS), ("f", NESTED), ("ping", {})],
    ),
    "pythonic inside python tags, JSON names": (
        "pythonic",
        "<|python_start|>[ns.ping(on=true, off=false, none=null)]<|python_end|>",
        None,
        [("ns.ping", {"on": True, "off": False, "none": None})],
    ),
    "pythonic prose": ("pythonic", "[1] is a reference.", "[1] is a reference.", []),
    "pythonic code is never run": (
        "pythonic",
        "[f(x=__import__('os').getcwd())]",
        "[f(x=__import__('os').getcwd())]",
        [],
    ),
    "pythonic unterminated": ("pythonic", "[f(a=1", "[f(a=1", []),
    "kimi_k2 two calls": (
        "kimi_k2",
        "Checking. "
        + KIMI_BEGIN
        + kimi_call("get_weather", 0, ARGS)
        + kimi_call("f", 1, NESTED)
        + KIMI_END,
        "Checking.",
        [("get_weather", ARGS), ("f", NESTED)],
    ),
    "kimi_k2 bad JSON is content": (
        "kimi_k2",
        KIMI_BEGIN
        + "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{x<|tool_call_end|>",
        "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{x<|tool_call_end|>",
        [],
    ),
    "gpt-oss call after a preamble": (
        "gpt-oss",
        "<|channel|>commentary<|message|>Looking it up.<|end|>" + harmony_call("get_weather", ARGS),
        "Looking it up.",
        [("get_weather", ARGS)],
    ),
    "gpt-oss two calls, recipient before the channel": (
        "gpt-oss",
        harmony_call("get_weather", ARGS, start="")
        + "<|start|>assistant to=functions.f<|channel|>commentary json<|message|>"
        + json.dumps(NESTED)
        + "<|call|>",
        None,
        [("get_weather", ARGS), ("f", NESTED)],
    ),
    "gpt-oss final answer only": (
        "gpt-oss",
        "<|channel|>final<|message|>It is sunny.<|return|>",
        "It is sunny.",
        [],
    ),
    "gpt-oss bad JSON is content": (
        "gpt-oss",
        "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{x<|call|>",
        "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{x<|call|>",
        [],
    ),
}


def calls_of(tool_calls):
    return [(call.name, json.loads(call.arguments)) for call in tool_calls]


def run_stream(name, chunks):
    stream = get_tool_parser(name).streaming(TOOLS)
    events = [event for chunk in chunks for event in stream.feed(chunk)] + stream.finish()
    content = "".join(event for event in events if isinstance(event, str))
    calls: dict[int, dict] = {}
    for delta in (event for event in events if isinstance(event, dict)):
        call = calls.setdefault(delta["index"], {"name": None, "arguments": ""})
        if "id" in delta:
            assert call["name"] is None and delta["function"]["name"]
            call["name"] = delta["function"]["name"]
        call["arguments"] += delta["function"]["arguments"]
    assert list(calls) == list(range(len(calls)))
    return content, [(call["name"], json.loads(call["arguments"])) for call in calls.values()]


@pytest.mark.parametrize("case", CASES)
def test_whole_output_parses(case):
    name, text, content, calls = CASES[case]
    parsed = get_tool_parser(name).parse(text, TOOLS)
    assert parsed.content == content
    assert calls_of(parsed.tool_calls) == calls
    assert len({call.id for call in parsed.tool_calls}) == len(calls)


@pytest.mark.parametrize("case", CASES)
def test_a_stream_cut_at_every_character_gives_the_whole_parse(case):
    name, text, content, calls = CASES[case]
    for chunks in [list(text), *([text[:i], text[i:]] for i in range(len(text) + 1))]:
        streamed_content, streamed_calls = run_stream(name, chunks)
        assert (streamed_content or None if calls else streamed_content) == content, chunks
        assert streamed_calls == calls, chunks


def test_kimi_k2_keeps_the_models_call_ids():
    text = KIMI_BEGIN + kimi_call("get_weather", 0, ARGS) + kimi_call("ping", 1, {}) + KIMI_END
    ids = [call.id for call in get_tool_parser("kimi_k2").parse(text).tool_calls]
    assert ids == ["functions.get_weather:0", "functions.ping:1"]


def test_content_streams_before_the_call_arrives():
    stream = get_tool_parser("deepseekv3").streaming()
    assert stream.feed("Let me check" + DS_BEGIN[:5]) == ["Let me check"]
    assert stream.feed(DS_BEGIN[5:] + ds_call("ping", {})[:-3]) == []
    assert [event["function"]["name"] for event in stream.feed(ds_call("ping", {})[-3:])[:1]] == [
        "ping"
    ]


def test_gpt_oss_reasoning_then_tool_parser_on_the_content():
    text = "<|channel|>analysis<|message|>Weather needs a call.<|end|>" + harmony_call(
        "get_weather", ARGS
    )
    split = get_reasoning_parser("gpt-oss").parse(text)
    assert split.reasoning == "Weather needs a call."
    parsed = get_tool_parser("gpt-oss").parse(split.content)
    assert (parsed.content, calls_of(parsed.tool_calls)) == (None, [("get_weather", ARGS)])


def test_sglang_and_vllm_names():
    for name in ("qwen3_coder", "mistral", "deepseekv3", "pythonic", "kimi_k2", "gpt-oss"):
        assert get_tool_parser(name).name == name
    assert get_tool_parser("deepseek_v3") is get_tool_parser("deepseekv3")
    assert get_tool_parser("openai") is get_tool_parser("gpt-oss")


def test_every_name_the_flag_honours_is_a_registered_parser():
    flag = next(f for f in dataclasses.fields(ServerArgs) if f.name == "tool_call_parser")
    value_map = flag.metadata["value_map"]
    names = {value_map.get(name, name) for name in flag.metadata["supported"]} - {None}
    assert names <= set(TOOL_PARSERS)
    assert {parser.name for parser in TOOL_PARSERS.values()} <= names


# Marker pieces of every format, shuffled into random outputs: nothing raises, and a stream cut
# anywhere gives the whole parse (tool parsers and reasoning parsers alike).
FUZZ_PIECES = [
    *("<think>", "</think>", "◁think▷", "◁/think▷", "<tool_call>", "</tool_call>", "<function=f>"),
    *("</function>", "<parameter=a>", "</parameter>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    *(DS_BEGIN, DS_CALL, DS_SEP, DS_CALL_END, DS_END, "function", "```json\n", "\n```"),
    *(KIMI_BEGIN, "<|tool_call_begin|>", "functions.f:0", "<|tool_call_argument_begin|>"),
    *("<|tool_call_end|>", "<|channel|>", "analysis", "final", "commentary to=functions.f"),
    *("<|constrain|>json", "<|message|>", "<|end|>", "<|call|>", "<|start|>assistant"),
    *('{"a": 1}', '{"name": "f", "arguments": {}}', "[", "]", "f(a=1)", '"', "{", "}", " ", "\n"),
    *("x", "<|python_start|>"),
]


def random_cuts(rng, text):
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 5))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_random_marker_soup_streams_as_it_parses():
    rng = random.Random(18)
    for _ in range(300):
        text = "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 14)))
        for name in TOOL_PARSERS:
            whole = get_tool_parser(name).parse(text)
            stream = get_tool_parser(name).streaming()
            chunks = random_cuts(rng, text)
            events = [e for chunk in chunks for e in stream.feed(chunk)] + stream.finish()
            arguments: dict[int, str] = {}
            for event in events:
                if isinstance(event, dict):
                    so_far = arguments.get(event["index"], "")
                    arguments[event["index"]] = so_far + event["function"]["arguments"]
            content = "".join(e for e in events if isinstance(e, str))
            assert content == (whole.content or ""), (name, chunks)
            assert list(arguments.values()) == [c.arguments for c in whole.tool_calls], (name, text)
        for name in REASONING_PARSER_NAMES:
            whole = get_reasoning_parser(name).parse(text)
            splitter = get_reasoning_parser(name).splitter()
            pieces = [splitter.feed(chunk) for chunk in random_cuts(rng, text)] + [
                splitter.finish()
            ]
            reasoning = "".join(r for r, _ in pieces) or None
            assert (reasoning, "".join(c for _, c in pieces)) == (whole.reasoning, whole.content)
