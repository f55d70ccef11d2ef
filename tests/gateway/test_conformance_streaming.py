"""Issue 18 item 2: a streamed response puts finish_reason on the chunk of its last output, with no
extra empty chunk after it (as SGLang and vLLM); a finish with no output of its own still gets one
chunk. The fake scheduler sends two tokens per message, so a 50-token output is 25 content chunks."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.gateway.fakes import EOS_MARKER, MESSAGES, MODEL, RunningGateway, expected_output


@pytest.fixture(scope="module")
def gw(backends):
    running = RunningGateway(backends)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(gw):
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0, timeout=30)


def stream_choices(gw, path: str, body: dict) -> list[dict]:
    """Every chunk's choices[0] (the usage chunk has none), in order."""
    with httpx.stream("POST", gw.base_url + path, json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        frames = r.read().split(b"\n\n")
    assert frames[-2:] == [b"data: [DONE]", b""]
    chunks = [json.loads(frame.removeprefix(b"data: ")) for frame in frames[:-2]]
    return [c["choices"][0] for c in chunks if c["choices"]]


def test_completion_of_50_tokens_streams_only_content_chunks_the_last_with_finish_reason(gw):
    choices = stream_choices(gw, "/v1/completions", {"prompt": "Once", "max_tokens": 50})
    assert len(choices) == 25  # one per scheduler message (two tokens each); no 26th empty one
    assert all(c["text"] for c in choices)
    assert "".join(c["text"] for c in choices) == expected_output(50)
    assert [c["finish_reason"] for c in choices] == [None] * 24 + ["length"]


def test_chat_of_50_tokens_streams_only_content_chunks_the_last_with_finish_reason(gw):
    choices = stream_choices(gw, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 50})
    role, *content = choices
    assert role["delta"] == {"role": "assistant", "content": ""}
    assert len(content) == 25 and all(c["delta"]["content"] for c in content)
    assert "".join(c["delta"]["content"] for c in content) == expected_output(50)
    assert [c["finish_reason"] for c in [role, *content]] == [None] * 25 + ["length"]


def test_eos_finish_rides_on_the_last_text_chunk(gw):
    choices = stream_choices(gw, "/v1/completions", {"prompt": EOS_MARKER, "max_tokens": 50})
    assert "".join(c["text"] for c in choices) == expected_output(5)
    assert [c["finish_reason"] for c in choices] == [None, None, "stop"]
    assert choices[-1]["text"] == expected_output(5)[4:]  # the EOS token itself has no text


@pytest.mark.parametrize("stop", ["own f", "qu"])  # the stop string swallows a message's text
def test_stop_string_finish_is_sent_once_even_when_it_swallows_the_tail(gw, stop):
    choices = stream_choices(gw, "/v1/completions", {"prompt": "a", "max_tokens": 40, "stop": stop})
    text = expected_output(40)
    assert "".join(c["text"] for c in choices) == text[: text.index(stop)]
    assert [c["finish_reason"] for c in choices].count("stop") == 1
    assert choices[-1]["finish_reason"] == "stop"
    assert all(c["text"] for c in choices[:-1])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_each_of_n_choices_gets_exactly_one_finish_reason(gw, path):
    body = {"prompt": "Once"} if path == "/v1/completions" else {"messages": MESSAGES}
    choices = stream_choices(gw, path, {**body, "max_tokens": 9, "n": 3})
    for index in range(3):
        mine = [c for c in choices if c["index"] == index]
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert [c["finish_reason"] for c in mine].count("length") == 1
        text = "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in mine)
        assert text == expected_output(9)


def test_logprobs_and_continuous_usage_ride_on_the_finish_chunk(gw):
    body = {
        "prompt": "Once",
        "max_tokens": 3,
        "logprobs": 1,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", gw.base_url + "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(f[6:]) for f in r.read().split(b"\n\n")[:-2]]
    *content, usage = chunks
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, "length"]
    last = content[-1]
    assert last["choices"][0]["logprobs"]["tokens"] == [expected_output(3)[2]]
    assert last["usage"]["completion_tokens"] == 3 and usage["usage"]["completion_tokens"] == 3


def test_openai_client_sees_finish_reason_on_the_last_content_chunk(client):
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, stream=True)
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].delta.content == expected_output(4)[2:]
    completion = list(client.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=True))
    assert [c.choices[0].finish_reason for c in completion] == [None, "length"]


def test_tool_parser_flush_at_the_end_is_sent_once_with_the_finish_reason(backends):
    """The hermes parser holds trailing whitespace until it knows no call follows: at the finish
    it flushes it, on the chunk that carries finish_reason."""
    gw = RunningGateway(backends, tool_call_parser="hermes")
    try:
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        body = {"messages": MESSAGES, "max_tokens": 4, "tools": tools}
        _, *content = stream_choices(gw, "/v1/chat/completions", body)
        assert [c["delta"] for c in content] == [
            {"content": "Th"},
            {"content": "e"},
            {"content": " "},
        ]
        assert [c["finish_reason"] for c in content] == [None, None, "length"]
    finally:
        gw.close()
