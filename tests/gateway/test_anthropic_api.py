"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) through the official
`anthropic` client, on the fake backends. The fake model's output is scripted by a marker in the
prompt (the latest one wins), so that tool calls in hermes' format can be answered."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter

from tests.gateway import fakes
from tests.gateway.fakes import EOS_ID, MODEL, RunningGateway, expected_output

MAX_PAYLOAD = 64 * 1024
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def hermes_call(city: str) -> str:
    call = {"name": "get_weather", "arguments": {"city": city}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


SCRIPTS = {
    "WEATHER?": "Let me check." + hermes_call("Paris"),
    "TWO CITIES?": hermes_call("Paris") + hermes_call("Rome"),
    "SUNNY_RESULT": "It is sunny in Paris.",
    "ANY TOOL!": json.dumps([{"name": "get_weather", "parameters": {"city": "Oslo"}}]),
    "NAMED TOOL!": json.dumps({"city": "Lima"}),
}


def scripted_output_token(i: int, prompt: list[int]) -> int:
    text = "".join(map(chr, prompt))
    found = [(text.rfind(marker), output) for marker, output in SCRIPTS.items() if marker in text]
    if not found:
        return ORIGINAL_OUTPUT_TOKEN(i, prompt)
    output = max(found)[1]
    return ord(output[i]) if i < len(output) else EOS_ID


ORIGINAL_OUTPUT_TOKEN = fakes.output_token


@pytest.fixture(scope="module")
def gw(backends):
    fakes.output_token = scripted_output_token
    running = RunningGateway(backends, tool_call_parser="hermes", max_payload_size=MAX_PAYLOAD)
    yield running
    running.close()
    fakes.output_token = ORIGINAL_OUTPUT_TOKEN


@pytest.fixture(scope="module")
def client(gw):
    with anthropic.Anthropic(base_url=gw.base_url, api_key="unused", max_retries=0) as c:
        yield c


def validated_message(data: dict) -> Message:
    """Strictly against the client's own type (the client itself constructs leniently)."""
    return Message.model_validate(data)


def raw_events(gw, body: dict) -> tuple[list[str], list[dict]]:
    """The event names and data of a streamed response, each data validated as the client's type."""
    with httpx.stream("POST", gw.base_url + "/v1/messages", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    names, datas = [], []
    for frame in text.strip().split("\n\n"):
        event_line, data_line = frame.split("\n")
        names.append(event_line.removeprefix("event: "))
        datas.append(json.loads(data_line.removeprefix("data: ")))
        assert datas[-1]["type"] == names[-1]
    adapter = TypeAdapter(RawMessageStreamEvent)
    for data in datas:
        if data["type"] != "ping":
            adapter.validate_python(data)
    return names, datas


def test_create_message_with_system_blocks_and_stop_reasons(client, backends):
    message = client.messages.create(
        model=MODEL,
        max_tokens=7,
        system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
    )
    validated_message(message.model_dump())
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.role == "assistant" and message.model == MODEL
    assert [(b.type, b.text) for b in message.content] == [("text", expected_output(7))]
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
    prompt = "<system>Be brief.<user>Hello<assistant>"
    assert backends.scheduler.prompts[-1] == fakes.encode(prompt)
    usage = message.usage
    assert usage.output_tokens == 7
    assert usage.input_tokens + usage.cache_read_input_tokens == len(prompt)

    stopped = client.messages.create(
        model=MODEL,
        max_tokens=40,
        stop_sequences=["fox"],
        messages=[{"role": "user", "content": "Hi"}],
    )
    assert stopped.content[0].text == "The quick brown "
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "fox")

    ended = client.messages.create(
        model=MODEL, max_tokens=40, messages=[{"role": "user", "content": "SUNNY_RESULT"}]
    )
    assert ended.content[0].text == "It is sunny in Paris."
    assert (ended.stop_reason, ended.stop_sequence) == ("end_turn", None)


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_beyond_the_context_stops_at_its_end(client, stream):
    prompt = "<user>Hi<assistant>"
    kwargs = dict(model=MODEL, max_tokens=1000, messages=[{"role": "user", "content": "Hi"}])
    if stream:
        with client.messages.stream(**kwargs) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    room = fakes.CONTEXT_LENGTH - len(prompt)
    assert message.content[0].text == expected_output(room)
    assert (message.stop_reason, message.usage.output_tokens) == (
        "model_context_window_exceeded",
        room,
    )


def test_a_prompt_that_fills_the_context_is_refused(gw):
    body = {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "x" * fakes.CONTEXT_LENGTH}],
    }
    r = httpx.post(gw.base_url + "/v1/messages", json=body, timeout=30)
    assert "maximum context length" in assert_anthropic_error(r, 400, "invalid_request_error")


def test_prefill_continues_the_last_assistant_message(client, backends):
    client.messages.create(
        model=MODEL,
        max_tokens=3,
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "The answer is ("},
        ],
    )
    assert backends.scheduler.prompts[-1] == fakes.encode("<user>Hi<assistant>The answer is (")


def test_streaming_text_through_the_client(client):
    with client.messages.stream(
        model=MODEL, max_tokens=9, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected_output(9)
    assert final.content[0].text == text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 9
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == len(
        "<user>Hi<assistant>"
    )


def test_stream_event_sequence_for_text(gw):
    body = {
        "model": MODEL,
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    names, datas = raw_events(gw, body)
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = datas[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": len("<user>Hi<assistant>"), "output_tokens": 0}
    assert datas[2] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": "", "citations": None},
    }
    assert "".join(d["delta"]["text"] for d in datas[3:-3]) == expected_output(5)
    assert datas[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert datas[-2]["usage"]["output_tokens"] == 5


def test_tool_use_then_tool_result_round_trip(client, backends):
    messages = [{"role": "user", "content": "WEATHER?"}]
    first = client.messages.create(
        model=MODEL, max_tokens=150, tools=[WEATHER_TOOL], messages=messages
    )
    validated_message(first.model_dump())
    assert first.stop_reason == "tool_use"
    text, call = first.content
    assert (text.type, text.text) == ("text", "Let me check.")
    assert (call.type, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris"})
    messages += [
        {"role": "assistant", "content": first.content},  # as agents pass it back
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "SUNNY_RESULT"},
                {"type": "text", "text": "Thanks"},
            ],
        },
    ]
    second = client.messages.create(
        model=MODEL, max_tokens=150, tools=[WEATHER_TOOL], messages=messages
    )
    assert second.stop_reason == "end_turn"
    assert [b.text for b in second.content] == ["It is sunny in Paris."]
    # The fake template shows content only: the tool turn is a tool message, then the user's text.
    prompt = "<user>WEATHER?<assistant>Let me check.<tool>SUNNY_RESULT<user>Thanks<assistant>"
    assert backends.scheduler.prompts[-1] == fakes.encode(prompt)


def test_tool_result_error_and_block_content_reach_the_model(client, backends):
    call = {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "X"}}
    result = {
        "type": "tool_result",
        "tool_use_id": "call_1",
        "is_error": True,
        "content": [{"type": "text", "text": "no"}, {"type": "text", "text": "such city"}],
    }
    client.messages.create(
        model=MODEL,
        max_tokens=2,
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": [result]},
        ],
    )
    prompt = "<user>Hi<assistant><tool>Error: no\nsuch city<assistant>"
    assert backends.scheduler.prompts[-1] == fakes.encode(prompt)


def test_streamed_tool_use_through_the_client(client, gw):
    with client.messages.stream(
        model=MODEL,
        max_tokens=200,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "WEATHER?"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Let me check."
    assert final.content[1].input == {"city": "Paris"}

    body = {
        "model": MODEL,
        "max_tokens": 200,
        "stream": True,
        "tools": [WEATHER_TOOL],
        "messages": [{"role": "user", "content": "WEATHER?"}],
    }
    names, datas = raw_events(gw, body)
    starts = [d for d in datas if d["type"] == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [
        (0, "text"),
        (1, "tool_use"),
    ]
    assert starts[1]["content_block"]["input"] == {}
    partial = "".join(
        d["delta"]["partial_json"]
        for d in datas
        if d["type"] == "content_block_delta" and d["index"] == 1
    )
    assert json.loads(partial) == {"city": "Paris"}
    stops = [d["index"] for d in datas if d["type"] == "content_block_stop"]
    assert stops == [0, 1]
    assert datas[-2]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize("stream", [False, True])
def test_disable_parallel_tool_use_keeps_the_first_call(client, stream):
    kwargs = dict(
        model=MODEL,
        max_tokens=200,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "TWO CITIES?"}],
    )
    if stream:
        with client.messages.stream(**kwargs) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert [(b.type, b.input) for b in message.content] == [("tool_use", {"city": "Paris"})]
    assert message.stop_reason == "tool_use"
    del kwargs["tool_choice"]
    both = client.messages.create(**kwargs)
    assert [b.input["city"] for b in both.content] == ["Paris", "Rome"]


@pytest.mark.parametrize(
    "tool_choice, marker, city",
    [
        ({"type": "any"}, "ANY TOOL!", "Oslo"),
        ({"type": "tool", "name": "get_weather"}, "NAMED TOOL!", "Lima"),
    ],
)
def test_forced_tool_choices(client, tool_choice, marker, city):
    message = client.messages.create(
        model=MODEL,
        max_tokens=200,
        tools=[WEATHER_TOOL],
        tool_choice=tool_choice,
        messages=[{"role": "user", "content": marker}],
    )
    assert message.stop_reason == "tool_use"
    [call] = message.content
    assert (call.name, call.input) == ("get_weather", {"city": city})


def test_tool_choice_none_answers_text(client):
    message = client.messages.create(
        model=MODEL,
        max_tokens=200,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "none"},
        messages=[{"role": "user", "content": "WEATHER?"}],
    )
    assert message.stop_reason == "end_turn"
    assert [b.type for b in message.content] == ["text"]
    assert "<tool_call>" in message.content[0].text


def test_count_tokens(client):
    counted = client.messages.count_tokens(
        model=MODEL,
        system="Be brief.",
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Hello"}],
    )
    MessageTokensCount.model_validate(counted.model_dump())
    assert counted.input_tokens == len("<system>Be brief.<user>Hello<assistant>")


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    return body["error"]["message"]


def test_errors_through_the_client(client):
    with pytest.raises(anthropic.BadRequestError) as missing:
        client.post(
            "/v1/messages",
            body={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
            cast_to=Message,
        )
    assert missing.value.status_code == 400
    assert missing.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(
            model="claude-no-such-model", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )
    assert unknown.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(
            model="claude-no-such-model", messages=[{"role": "user", "content": "Hi"}]
        )


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"temperature": 1.5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages.0.content"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "a",
                                "content": [{"type": "document", "source": {}}],
                            }
                        ],
                    }
                ]
            },
            "document",
        ),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "name"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools.0"),
        ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER_TOOL]}, "nope"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"thinking": {"type": "enabled", "budget_tokens": 10}}, "budget_tokens"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}],
                    }
                ]
            },
            "assistant",
        ),
    ],
)
def test_bad_requests_are_anthropic_400s(gw, change, needle):
    body = {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hi"}],
        **change,
    }
    r = httpx.post(gw.base_url + "/v1/messages", json=body, timeout=30)
    assert needle in assert_anthropic_error(r, 400, "invalid_request_error")


def test_openai_routes_keep_openais_errors(gw):
    r = httpx.post(gw.base_url + "/v1/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code in (400, 404) and r.json()["error"]["type"] == "invalid_request_error"
    assert "type" not in r.json()
    r = httpx.post(gw.base_url + "/v1/messages", content=b"{not json", timeout=30)
    assert_anthropic_error(r, 400, "invalid_request_error")


@pytest.mark.parametrize("declared", [True, False])
def test_too_large_a_body_is_an_anthropic_413(gw, declared):
    body = json.dumps(
        {
            "model": MODEL,
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "x" * MAX_PAYLOAD}],
        }
    ).encode()
    content = body if declared else iter([body[:1024], body[1024:]])  # chunked: no content-length
    r = httpx.post(gw.base_url + "/v1/messages", content=content, timeout=30)
    assert_anthropic_error(r, 413, "request_too_large")


def test_accepted_fields_without_effect(client, backends):
    message = client.messages.create(
        model=MODEL,
        max_tokens=3,
        metadata={"user_id": "u-1"},
        thinking={"type": "enabled", "budget_tokens": 2048},
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 5},  # not in this client's create()
        system=[{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "sig"},
                    {"type": "text", "text": "Hello"},
                ],
            },
            {"role": "user", "content": "Again"},
        ],
    )
    assert message.content[0].text == expected_output(3)
    # Thinking blocks of earlier turns are not shown to the model.
    prompt = "<system>S<user>Hi<assistant>Hello<user>Again<assistant>"
    assert backends.scheduler.prompts[-1] == fakes.encode(prompt)


def test_system_role_messages_are_system_turns(client, backends):
    client.messages.create(
        model=MODEL,
        max_tokens=2,
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": [{"type": "text", "text": "Now be terse."}]},
            {"role": "user", "content": "Go"},
        ],
    )
    prompt = "<user>Hi<system>Now be terse.<user>Go<assistant>"
    assert backends.scheduler.prompts[-1] == fakes.encode(prompt)


def test_backend_failure_mid_stream_is_an_error_event(gw):
    body = {
        "model": MODEL,
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": fakes.FAIL_MARKER}],
    }
    with httpx.stream("POST", gw.base_url + "/v1/messages", json=body, timeout=30) as r:
        assert r.status_code == 200
        frames = r.read().decode().strip().split("\n\n")
    name, data = frames[-1].split("\n")
    assert name == "event: error"
    error = json.loads(data.removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
