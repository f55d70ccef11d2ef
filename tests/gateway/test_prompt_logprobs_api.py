"""Prompt logprobs through the gateway's three API shapes, over the fake services (tests/gateway/fakes.py:
one token per character; the fake scheduler gives prompt token j the logprob -j/8, rank 2, and the
alternatives "e" (-0.0625), then the token itself): /v1/completions echo with logprobs (OpenAI), vLLM's
prompt_logprobs, SGLang's /generate return_logprob with logprob_start_len."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import openai
import pytest

from radixserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from radixserve.common import sampling
from radixserve.gateway.pipeline import choices
from tests.gateway.fakes import MESSAGES, MODEL, RunningGateway, render_chat


@pytest.fixture(scope="module")
def gw(backends):
    running = RunningGateway(backends)
    yield running
    running.close()


def with_model(path: str, body: dict) -> dict:
    """OpenAI routes name the model; SGLang's /generate has no such field."""
    return {"model": MODEL, **body} if path.startswith("/v1/") else body


def post(gw, path, body):
    return httpx.post(gw.base_url + path, json=with_model(path, body), timeout=30)


def stream_events(gw, path, body) -> list[dict]:
    with httpx.stream("POST", gw.base_url + path, json=with_model(path, body), timeout=30) as r:
        assert r.status_code == 200, r.read()
        frames = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(f) for f in frames if f != "[DONE]"]


# "abc", then the fake output "The": prompt tokens 1 and 2 have logprobs -1/8 and -2/8.
ECHO_LOGPROBS = {
    "tokens": ["a", "b", "c", "T", "h", "e"],
    "token_logprobs": [None, -0.125, -0.25, -0.25, -0.25, -0.25],
    "top_logprobs": [
        None,
        {"e": -0.0625, "b": -0.125},
        {"e": -0.0625, "c": -0.25},
        {"T": -0.25, "?": -2.0},
        {"h": -0.25, "?": -2.0},
        {"e": -0.25, "?": -2.0},
    ],
    "text_offset": [0, 1, 2, 3, 4, 5],
}


def test_completion_echo_with_logprobs_puts_the_prompt_first(gw):
    r = post(gw, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "abcThe"
    assert choice["logprobs"] == ECHO_LOGPROBS
    assert "prompt_logprobs" not in choice


def test_streamed_echo_chunk_carries_the_prompt_logprobs(gw):
    events = stream_events(
        gw,
        "/v1/completions",
        {"prompt": "abc", "max_tokens": 3, "echo": True, "logprobs": 2, "stream": True},
    )
    choices = [e["choices"][0] for e in events]
    assert choices[0]["text"] == "abc"
    assert choices[0]["logprobs"]["tokens"] == ["a", "b", "c"]
    merged = {key: [] for key in ECHO_LOGPROBS}
    for c in choices:
        for key in merged:
            merged[key] += (c["logprobs"] or {}).get(key, [])
    assert merged == ECHO_LOGPROBS
    assert "".join(c["text"] for c in choices) == "abcThe"


def test_echo_without_logprobs_and_logprobs_without_echo_are_unchanged(gw):
    echo = post(gw, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "echo": True})
    assert echo.json()["choices"][0]["logprobs"] is None
    plain = post(gw, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "logprobs": 1})
    assert plain.json()["choices"][0]["logprobs"]["tokens"] == ["T", "h", "e"]
    assert plain.json()["choices"][0]["logprobs"]["text_offset"] == [0, 1, 2]


def vllm_entry(token: str, logprob: float, rank: int) -> dict:
    return {"logprob": logprob, "rank": rank, "decoded_token": token}


def test_vllm_prompt_logprobs_on_completions(gw):
    r = post(gw, "/v1/completions", {"prompt": "abc", "max_tokens": 2, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["prompt_logprobs"] == [
        None,
        {str(ord("b")): vllm_entry("b", -0.125, 2), str(ord("e")): vllm_entry("e", -0.0625, 1)},
        {str(ord("c")): vllm_entry("c", -0.25, 2), str(ord("e")): vllm_entry("e", -0.0625, 1)},
    ]
    assert choice["logprobs"] is None


def test_vllm_prompt_logprobs_on_chat_sit_beside_the_choices(gw):
    r = post(
        gw, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    rendered = render_chat(
        common_pb2.ChatConversation(
            messages=[common_pb2.ChatMessage(**m) for m in MESSAGES], add_generation_prompt=True
        )
    )
    got = body["prompt_logprobs"]
    assert len(got) == len(rendered) and got[0] is None
    assert got[3] == {str(ord(rendered[3])): vllm_entry(rendered[3], -3 / 8, 2)}


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/v1/completions",
            {"prompt": "abc", "prompt_logprobs": 1, "stream": True},
            "prompt_logprobs",
        ),
        ("/v1/completions", {"prompt": "abc", "prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "abc", "prompt_logprobs": -1}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "abc", "echo": True, "logprobs": 21}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "prompt_logprobs": 1, "stream": True},
            "prompt_logprobs",
        ),
        (
            "/generate",
            {"text": "Hello", "return_logprob": True, "logprob_start_len": 5},
            "logprob_start_len",
        ),
        (
            "/generate",
            {"text": "Hello", "return_logprob": True, "logprob_start_len": -2},
            "logprob_start_len",
        ),
        *[
            (
                "/generate",
                {"text": "H", "return_logprob": True, "token_ids_logprob": ids},
                "token_ids_logprob",
            )
            for ids in ([1] * 257, [-1], [0x110000])
        ],
    ],
)
def test_bad_prompt_logprob_requests_get_a_400(gw, path, body, param):
    short = (
        {"max_tokens": 2} if path.startswith("/v1/") else {"sampling_params": {"max_new_tokens": 2}}
    )
    r = post(gw, path, {**short, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_more_prompt_logprob_values_than_the_limit_get_a_400(gw, monkeypatch):
    monkeypatch.setattr(sampling, "MAX_PROMPT_LOGPROB_VALUES", 6)
    monkeypatch.setattr(choices, "MAX_PROMPT_LOGPROB_VALUES", 6)
    ok = post(gw, "/v1/completions", {"prompt": "abcd", "max_tokens": 1, "prompt_logprobs": 1})
    assert ok.status_code == 200, ok.text  # 3 positions x 2 values
    r = post(gw, "/v1/completions", {"prompt": "abcde", "max_tokens": 1, "prompt_logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    assert "limit" in r.json()["error"]["message"]
    # The limit holds for all the choices of one request together.
    for stream in (False, True):
        body = {"prompt": "ab", "max_tokens": 1, "echo": True, "logprobs": 1, "stream": stream}
        assert post(gw, "/v1/completions", {**body, "n": 3}).status_code == 200
        r = post(gw, "/v1/completions", {**body, "n": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    later = {"text": "abcde", "return_logprob": True, "logprob_start_len": 2, "top_logprobs_num": 1}
    assert post(gw, "/generate", later).status_code == 200


HELLO_INPUT = [
    [None, 72, "H"],
    [-0.125, 101, "e"],
    [-0.25, 108, "l"],
    [-0.375, 108, "l"],
    [-0.5, 111, "o"],
]
HELLO_OUTPUT = [[-0.25, 84, "T"], [-0.25, 104, "h"], [-0.25, 101, "e"]]


def test_generate_return_logprob_in_sglangs_tuples(gw):
    body = {
        "text": "Hello",
        "sampling_params": {"max_new_tokens": 3},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
    }
    r = post(gw, "/generate", body)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["input_token_logprobs"] == HELLO_INPUT
    assert meta["output_token_logprobs"] == HELLO_OUTPUT
    assert meta["input_top_logprobs"][0] is None
    assert meta["input_top_logprobs"][1] == [[-0.0625, 101, "e"], [-0.125, 101, "e"]]
    assert meta["output_top_logprobs"][0] == [[-0.25, 84, "T"], [-2.0, 63, "?"]]
    events = stream_events(gw, "/generate", {**body, "stream": True})
    last = events[-1]["meta_info"]
    for key in ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs"):
        assert last[key] == meta[key]
    assert last["output_top_logprobs"] == meta["output_top_logprobs"]


def test_generate_logprob_start_len_and_defaults(gw):
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 3}, "return_logprob": True}
    later = post(gw, "/generate", {**body, "logprob_start_len": 2}).json()["meta_info"]
    assert later["input_token_logprobs"] == [[lp, t, None] for lp, t, _ in HELLO_INPUT[2:]]
    assert "input_top_logprobs" not in later and "output_top_logprobs" not in later
    default = post(gw, "/generate", body).json()["meta_info"]
    assert default["input_token_logprobs"] == []
    assert default["output_token_logprobs"] == [[lp, t, None] for lp, t, _ in HELLO_OUTPUT]
    plain = post(gw, "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 3}})
    assert "input_token_logprobs" not in plain.json()["meta_info"]


def test_grpc_gateway_returns_prompt_logprobs_on_the_first_message(gw):
    async def call():
        async with grpc.aio.insecure_channel(gw.grpc_addr) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.GatewayGenerateRequest(
                text="Hello",
                sampling=common_pb2.SamplingParams(prompt_logprob_start=2),
                stopping=common_pb2.StoppingCriteria(max_new_tokens=3),
            )
            return [m async for m in stub.Generate(request)]

    messages = asyncio.run(call())
    assert [(e.token_id, e.logprob) for e in messages[0].prompt_logprobs] == [
        (108, -0.25),
        (108, -0.375),
        (111, -0.5),
    ]
    assert all(not m.prompt_logprobs for m in messages[1:])


def test_generate_token_ids_logprob_at_every_output_position(gw):
    body = {
        "text": "Hello",
        "sampling_params": {"max_new_tokens": 3},
        "return_logprob": True,
        "token_ids_logprob": [65, 66],
        "return_text_in_logprobs": True,
    }
    meta = post(gw, "/generate", body).json()["meta_info"]
    assert meta["output_token_ids_logprobs"] == [[[-4.0, 65, "A"], [-4.0, 66, "B"]]] * 3
    streamed = stream_events(gw, "/generate", {**body, "stream": True})[-1]["meta_info"]
    assert streamed["output_token_ids_logprobs"] == meta["output_token_ids_logprobs"]
    plain = post(gw, "/generate", {**body, "token_ids_logprob": None}).json()["meta_info"]
    assert "output_token_ids_logprobs" not in plain


def test_the_openai_client_reads_echo_logprobs_and_prompt_logprobs(gw):
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0, timeout=30)
    resp = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, echo=True, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp.tokens == ECHO_LOGPROBS["tokens"]
    assert lp.token_logprobs == ECHO_LOGPROBS["token_logprobs"]
    assert lp.top_logprobs == ECHO_LOGPROBS["top_logprobs"]
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="abc", max_tokens=3, echo=True, logprobs=2, stream=True
        )
    )
    assert chunks[0].choices[0].logprobs.token_logprobs == [None, -0.125, -0.25]
    vllm = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    assert vllm.choices[0].prompt_logprobs[0] is None
    assert vllm.choices[0].prompt_logprobs[1] == {str(ord("b")): vllm_entry("b", -0.125, 2)}
