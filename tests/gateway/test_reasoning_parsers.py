"""Reasoning parsers: whole-text splits per format, and streamed splits equal to them wherever the
deltas are cut (inside a marker too)."""

import json
from types import SimpleNamespace

import httpx
import openai
import pytest

from radixserve.gateway.api.openai_routes import chat_conversation
from radixserve.gateway.api.protocol import ChatCompletionRequest
from radixserve.gateway.pipeline.chat_reasoning import reasoning_parser_for
from radixserve.gateway.pipeline.reasoning_parsers import (
    REASONING_PARSER_NAMES,
    ReasoningSplit,
    get_reasoning_parser,
)
from tests.gateway import fakes
from tests.gateway.fakes import RunningGateway

HARMONY_CALL = (
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris"}<|call|>'
)

# (parser, model text, reasoning, content)
CASES = [
    (
        "qwen3",
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        "Let me think.",
        "The answer is 4.",
    ),
    ("qwen3", "The answer is 4.", None, "The answer is 4."),  # enable_thinking=false: no block
    ("qwen3", "<think>\nCut off by max_tok", "Cut off by max_tok", ""),
    ("qwen3", "  <think>a < b </thin", "a < b </thin", ""),
    ("qwen3", "Say <think> here", None, "Say <think> here"),
    ("qwen3", "<think></think>\n\nplain", None, "plain"),
    ("qwen3", "<think>x</think>keep  trailing\n", "x", "keep  trailing\n"),
    ("qwen3-thinking", "Step 1, step 2.\n</think>\n\nDone", "Step 1, step 2.", "Done"),
    ("deepseek-r1", "Hmm.\n\nWait.\n</think>\n\n42", "Hmm.\n\nWait.", "42"),
    ("deepseek-r1", "<think>\nrepeated opener\n</think>42", "repeated opener", "42"),
    ("deepseek-r1", "no end marker at all", "no end marker at all", ""),
    ("deepseek_r1", "r</think>c", "r", "c"),
    ("glm45", "<think>plan</think>reply", "plan", "reply"),
    ("kimi", "◁think▷ponder◁/think▷answer", "ponder", "answer"),
    ("kimi", "answer only", None, "answer only"),
    (
        "gpt-oss",
        "<|channel|>analysis<|message|>User wants 2+2.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4<|return|>",
        "User wants 2+2.",
        "4",
    ),
    ("gpt-oss", "<|channel|>analysis<|message|>cut off", "cut off", ""),
    (
        "openai_gptoss",
        "<|channel|>analysis<|message|>Need weather.<|end|>" + HARMONY_CALL,
        "Need weather.",
        HARMONY_CALL,
    ),
    ("gpt-oss", "plain text, no harmony", None, "plain text, no harmony"),
]


def streamed(name: str, deltas: list[str]) -> ReasoningSplit:
    splitter = get_reasoning_parser(name).splitter()
    reasoning, content = "", ""
    for delta in deltas:
        r, c = splitter.feed(delta)
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    return ReasoningSplit(reasoning + r or None, content + c)


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_whole_text_is_split_into_reasoning_and_content(name, text, reasoning, content):
    assert get_reasoning_parser(name).parse(text) == ReasoningSplit(reasoning, content)


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_a_stream_cut_at_every_character_splits_as_the_whole_text(name, text, reasoning, content):
    whole = ReasoningSplit(reasoning, content)
    for i in range(len(text) + 1):
        assert streamed(name, [text[:i], text[i:]]) == whole, i
    assert streamed(name, list(text)) == whole


def test_reasoning_streams_before_the_end_marker_arrives():
    splitter = get_reasoning_parser("qwen3").splitter()
    assert splitter.feed("<think>\nfirst ") == ("first", "")
    assert splitter.feed("second </th") == (" second", "")
    assert splitter.feed("ink>\n\nhello") == ("", "hello")
    assert splitter.finish() == ("", "")


def test_every_name_resolves_and_an_unknown_one_lists_the_known():
    for name in REASONING_PARSER_NAMES:
        assert get_reasoning_parser(name).parse("x") is not None
    assert {"deepseek-r1", "qwen3", "qwen3-thinking", "glm45", "kimi", "gpt-oss"} <= set(
        REASONING_PARSER_NAMES
    )
    with pytest.raises(ValueError, match="choose one of .*deepseek-r1"):
        get_reasoning_parser("nope")


# ---- /v1/chat/completions with --reasoning-parser, over the fake backends ----

THINKING_OUTPUT = (
    '<think>\nMaybe <tool_call>{"name": "ping"}</tool_call> later.\n</think>\n\nChecking.'
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
)
WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "ping"}},
]


@pytest.fixture(scope="module")
def thinking_gw(backends):
    running = RunningGateway(backends, reasoning_parser="qwen3", tool_call_parser="hermes")
    yield running
    running.close()


@pytest.fixture
def thinking_model(monkeypatch):
    """The fake model answers THINKING_OUTPUT, then repeats it (max_tokens cuts it)."""
    monkeypatch.setattr(fakes, "OUTPUT_TEXT", THINKING_OUTPUT)


@pytest.fixture
def client(thinking_gw):
    return openai.OpenAI(
        base_url=thinking_gw.base_url + "/v1", api_key="x", max_retries=0, timeout=30
    )


def chat(client, stream=False, **extra):
    return client.chat.completions.create(
        model=fakes.MODEL,
        messages=fakes.MESSAGES,
        max_tokens=len(THINKING_OUTPUT),
        stream=stream,
        extra_body=extra or None,
    )


def test_reasoning_and_content_are_returned_apart(thinking_model, client):
    message = chat(client).choices[0].message
    reasoning = 'Maybe <tool_call>{"name": "ping"}</tool_call> later.'
    assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"] == reasoning
    assert message.content == THINKING_OUTPUT[THINKING_OUTPUT.index("Checking") :]


def test_tool_calls_are_read_from_the_content_only(thinking_model, client):
    response = client.chat.completions.create(
        model=fakes.MODEL,
        messages=fakes.MESSAGES,
        max_tokens=len(THINKING_OUTPUT),
        tools=WEATHER_TOOLS,
    )
    choice = response.choices[0]
    assert [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls
    ] == [("get_weather", {"city": "Paris"})]
    assert choice.message.content == "Checking."
    # max_tokens ends the answer right after the call: "length", as OpenAI (tool_calls only when
    # the model stops on its own).
    assert choice.finish_reason == "length"
    assert "ping" in choice.message.model_extra["reasoning_content"]


def test_streamed_reasoning_and_content_add_up_to_the_whole(thinking_model, client):
    whole = chat(client).choices[0].message
    reasoning, content, reasoning_chunks = "", "", 0
    for chunk in chat(client, stream=True):
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            if extra.get("reasoning_content"):
                assert extra["reasoning"] == extra["reasoning_content"]
                reasoning += extra["reasoning_content"]
                reasoning_chunks += 1
            content += choice.delta.content or ""
    assert reasoning == whole.model_extra["reasoning_content"] and reasoning_chunks > 1
    assert content == whole.content


def test_streamed_tool_calls_come_from_the_content(thinking_model, client):
    stream = client.chat.completions.create(
        model=fakes.MODEL,
        messages=fakes.MESSAGES,
        max_tokens=len(THINKING_OUTPUT),
        tools=WEATHER_TOOLS,
        stream=True,
    )
    names, reasons = [], []
    for chunk in stream:
        for choice in chunk.choices:
            names += [call.function.name for call in choice.delta.tool_calls or [] if call.id]
            reasons.append(choice.finish_reason)
    assert names == ["get_weather"] and reasons[-1] == "length"


@pytest.mark.parametrize(
    "extra", [{"separate_reasoning": False}, {"chat_template_kwargs": {"enable_thinking": False}}]
)
def test_reasoning_split_off_leaves_the_text_whole(thinking_model, client, extra):
    message = chat(client, **extra).choices[0].message
    assert message.content == THINKING_OUTPUT
    assert message.model_extra["reasoning_content"] is None
    streamed = "".join(
        c.choices[0].delta.content or "" for c in chat(client, stream=True, **extra) if c.choices
    )
    assert streamed == THINKING_OUTPUT


def test_output_cut_inside_the_reasoning_is_all_reasoning(thinking_model, client):
    message = client.chat.completions.create(
        model=fakes.MODEL, messages=fakes.MESSAGES, max_tokens=19
    ).choices[0]
    assert message.finish_reason == "length"
    assert message.message.model_extra["reasoning_content"] == "Maybe <tool"
    assert message.message.content is None


def test_chat_template_kwargs_reach_the_template():
    req = ChatCompletionRequest(
        messages=fakes.MESSAGES, chat_template_kwargs={"enable_thinking": False}
    )
    assert json.loads(chat_conversation(req).template_kwargs_json) == {"enable_thinking": False}
    assert (
        chat_conversation(ChatCompletionRequest(messages=fakes.MESSAGES)).template_kwargs_json == ""
    )


def test_chat_template_kwargs_must_be_an_object(client):
    with pytest.raises(openai.BadRequestError):
        chat(client, chat_template_kwargs=["enable_thinking"])


def test_without_a_reasoning_parser_the_fields_are_null(thinking_model, backends):
    plain = RunningGateway(backends)
    try:
        body = {"messages": fakes.MESSAGES, "max_tokens": len(THINKING_OUTPUT)}
        message = httpx.post(plain.base_url + "/v1/chat/completions", json=body).json()
        message = message["choices"][0]["message"]
        assert message["content"] == THINKING_OUTPUT and message["reasoning_content"] is None
    finally:
        plain.close()


def test_which_requests_get_their_reasoning_split():
    engine = SimpleNamespace(args=SimpleNamespace(reasoning_parser="deepseek-r1"))
    assert reasoning_parser_for(engine).name == "deepseek-r1"
    assert reasoning_parser_for(engine, separate_reasoning=False) is None
    assert reasoning_parser_for(engine, chat_template_kwargs={"enable_thinking": False}) is None
    assert reasoning_parser_for(engine, chat_template_kwargs={"thinking": False}) is None
    assert reasoning_parser_for(engine, chat_template_kwargs={"enable_thinking": True}) is not None
    # Output constrained from its first token (JSON schema, tool_choice "required") has no reasoning.
    assert reasoning_parser_for(engine, constrained=True) is None
    engine.args.reasoning_parser = None
    assert reasoning_parser_for(engine) is None


def streamed_parts(client, **extra) -> list[tuple[str, str]]:
    """The stream's ("reasoning" | "content", text) deltas in order."""
    parts = []
    for chunk in chat(client, stream=True, **extra):
        for choice in chunk.choices:
            extra_fields = choice.delta.model_extra or {}
            if extra_fields.get("reasoning_content"):
                assert extra_fields["reasoning"] == extra_fields["reasoning_content"]
                parts.append(("reasoning", extra_fields["reasoning_content"]))
            if choice.delta.content:
                parts.append(("content", choice.delta.content))
    return parts


def test_stream_reasoning_false_sends_the_reasoning_in_one_chunk(thinking_model, client):
    whole = chat(client).choices[0].message
    parts = streamed_parts(client, stream_reasoning=False)
    assert parts[0] == ("reasoning", whole.model_extra["reasoning_content"])
    assert [kind for kind, _ in parts[1:]] == ["content"] * (len(parts) - 1) and len(parts) > 2
    assert "".join(text for _, text in parts[1:]) == whole.content
    # Cut inside the reasoning: it comes whole at the end.
    cut = client.chat.completions.create(
        model=fakes.MODEL,
        messages=fakes.MESSAGES,
        max_tokens=19,
        stream=True,
        extra_body={"stream_reasoning": False},
    )
    reasoning = [
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in cut if c.choices
    ]
    assert [r for r in reasoning if r] == ["Maybe <tool"]


def test_include_reasoning_false_leaves_the_reasoning_out(thinking_model, client):
    whole = chat(client).choices[0].message
    message = chat(client, include_reasoning=False).choices[0].message
    assert message.content == whole.content
    assert message.model_extra["reasoning_content"] is None
    parts = streamed_parts(client, include_reasoning=False)
    assert {kind for kind, _ in parts} == {"content"}
    assert "".join(text for _, text in parts) == whole.content
