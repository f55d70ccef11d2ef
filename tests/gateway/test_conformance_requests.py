"""Issue 18 items 4 and 6 (its rule on unknown fields): request validation as OpenAI and vLLM do it,
through the HTTP API and the `openai` client, and the bodies LangChain, litellm and Open WebUI send."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from radixserve.gateway.api.protocol import (
    AbortRequest,
    ChatCompletionRequest,
    CompletionRequest,
    NativeGenerateRequest,
)
from tests.gateway.fakes import MESSAGES, MODEL, RunningGateway, expected_output


@pytest.fixture(scope="module")
def gw(backends):
    running = RunningGateway(backends, tool_call_parser="hermes")
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(gw):
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0, timeout=30)


CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3}
COMPLETION = {"model": MODEL, "prompt": "Once", "max_tokens": 3}


def post(gw, path: str, body: dict) -> httpx.Response:
    return httpx.post(gw.base_url + path, json=body, timeout=30)


def assert_400(response: httpx.Response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error


# ---- item 4 ----


@pytest.mark.parametrize(
    "path,body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
)
@pytest.mark.parametrize("stream", [False, None, "absent"])
def test_stream_options_without_stream_is_a_400(gw, path, body, stream):
    body = {**body, "stream_options": {"include_usage": True}}
    if stream != "absent":
        body["stream"] = stream
    error = assert_400(post(gw, path, body), "stream_options")
    assert "stream" in error["message"]


def test_stream_options_null_without_stream_and_with_stream_are_fine(gw):
    assert post(gw, "/v1/chat/completions", {**CHAT, "stream_options": None}).status_code == 200
    streamed = {**COMPLETION, "stream": True, "stream_options": {"include_usage": False}}
    assert post(gw, "/v1/completions", streamed).status_code == 200


def test_openai_client_gets_the_stream_options_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, stream_options={"include_usage": True}
        )
    assert caught.value.body["param"] == "stream_options"


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**64 + 5])
@pytest.mark.parametrize(
    "path,body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
)
def test_seed_outside_int64_is_a_400(gw, path, body, seed):
    assert_400(post(gw, path, {**body, "seed": seed}), "seed")


def test_seed_at_the_int64_bounds_is_fine(gw):
    for seed in (2**63 - 1, -(2**63)):
        assert post(gw, "/v1/completions", {**COMPLETION, "seed": seed}).status_code == 200
    native = {"text": "a", "sampling_params": {"max_new_tokens": 2, "sampling_seed": 2**63}}
    assert_400(post(gw, "/generate", native), "sampling_params.sampling_seed")


def test_logprobs_0_gives_one_entry_top_logprobs_of_the_sampled_token(gw, client):
    body = {**COMPLETION, "logprobs": 0}
    plain = post(gw, "/v1/completions", body).json()["choices"][0]["logprobs"]
    tokens = list(expected_output(3))
    assert plain["tokens"] == tokens
    assert plain["top_logprobs"] == [{t: -0.25} for t in tokens]

    chunks = list(client.completions.create(**body, stream=True))
    streamed = [
        t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.top_logprobs
    ]
    assert streamed == [{t: -0.25} for t in tokens]


def test_logprobs_k_always_holds_the_sampled_token(gw):
    tops = post(gw, "/v1/completions", {**COMPLETION, "logprobs": 2}).json()["choices"][0]
    assert tops["logprobs"]["top_logprobs"][0] == {"T": -0.25, "?": -2.0}


NO_CONTENT = [
    {"role": "user"},
    {"role": "user", "content": None},
    {"role": "system", "content": None},
    {"role": "developer"},
    {"role": "tool", "tool_call_id": "call_1"},
    {"role": "assistant", "content": None},
    {"role": "assistant"},
]


@pytest.mark.parametrize("message", NO_CONTENT)
def test_a_message_without_content_is_a_400(gw, client, message):
    body = {**CHAT, "messages": [*MESSAGES, message]}
    error = assert_400(post(gw, "/v1/chat/completions", body), "messages.1.content")
    assert "content" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**body)


def test_an_assistant_message_with_tool_calls_may_leave_content_out(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for assistant in (
        {"role": "assistant", "tool_calls": [call]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ):
        messages = [
            *MESSAGES,
            assistant,
            {"role": "tool", "tool_call_id": "call_1", "content": "1"},
        ]
        resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert resp.choices[0].message.content == expected_output(2)


# ---- item 6: unknown fields are rejected, the listed ones accepted ----


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {**CHAT, "frobnicate": 1}, "frobnicate"),
        ("/v1/completions", {**COMPLETION, "best_of_n": 2}, "best_of_n"),
        ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions"),
        ("/v1/completions", {**COMPLETION, "top_logprobs_num": 3}, "top_logprobs_num"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "x", "colour": "red"}]},
            "messages.0.colour",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
            "stream_options.x",
        ),
        ("/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, "modalities.1"),
        ("/generate", {"text": "a", "return_hidden_states": True}, "return_hidden_states"),
        (
            "/generate",
            {"text": "a", "sampling_params": {"no_stop_trim": True}},
            "sampling_params.no_stop_trim",
        ),
        ("/abort_request", {"rid": "x", "everything": True}, "everything"),
    ],
)
def test_an_unknown_field_is_a_400_naming_it(gw, path, body, param):
    error = assert_400(post(gw, path, body), param)
    if param != "modalities.1":
        assert error["message"] == f"Unrecognized request argument supplied: {param}"


def test_openai_client_extra_body_with_an_unknown_field_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: foo"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"foo": 1})


@pytest.mark.parametrize(
    "body_class,path,body",
    [
        (ChatCompletionRequest, "/v1/chat/completions", CHAT),
        (CompletionRequest, "/v1/completions", COMPLETION),
    ],
)
def test_every_listed_ignored_field_is_accepted(gw, body_class, path, body):
    ignored = body_class.ignored_fields()
    assert ignored and all(reason for reason in ignored.values())
    for name in ignored:
        assert post(gw, path, {**body, name: {"any": "value"}}).status_code == 200, name


def test_ignored_lists_merge_along_the_bases_and_stay_out_of_declared_fields():
    chat, text = ChatCompletionRequest.ignored_fields(), CompletionRequest.ignored_fields()
    assert {"user", "metadata", "store", "service_tier"} <= text.keys() <= chat.keys()
    assert {
        "parallel_tool_calls",
        "prediction",
        "reasoning_effort",
        "web_search_options",
    } <= chat.keys()
    for body_class in (
        ChatCompletionRequest,
        CompletionRequest,
        NativeGenerateRequest,
        AbortRequest,
    ):
        assert not body_class.ignored_fields().keys() & body_class.model_fields.keys()
        assert "ignored" not in body_class.model_fields


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

CLIENT_BODIES = {
    # langchain-openai ChatOpenAI: invoke, stream with usage, bind_tools, structured output
    "langchain-invoke": {**CHAT, "stream": False, "n": 1, "temperature": 0.7},
    "langchain-stream": {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    "langchain-tools": {
        **CHAT,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        ],
        "tools": [WEATHER_TOOL],
        "parallel_tool_calls": False,
        "stream": False,
    },
    "langchain-structured": {
        **CHAT,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "Answer",
                "strict": True,
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
        },
    },
    # litellm's OpenAI-compatible provider
    "litellm": {
        **CHAT,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "litellm-user-7",
        "metadata": {"trace": "x"},
        "temperature": 0.2,
        "top_p": 0.9,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "seed": 42,
        "stop": ["\n\n"],
    },
    # Open WebUI: a chat with the model's advanced parameters, and a background task
    "open-webui-chat": {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.8,
        "max_tokens": 3,
        "reasoning_effort": "medium",
        "logit_bias": {"65": -1.0},
        "seed": 1,
    },
    "open-webui-task": {"model": MODEL, "messages": MESSAGES, "stream": False, "max_tokens": 3},
    # the openai client's newer chat fields
    "openai-extras": {
        **CHAT,
        "store": True,
        "service_tier": "auto",
        "prediction": {"type": "content", "content": "The"},
        "modalities": ["text"],
        "web_search_options": {},
        "prompt_cache_key": "k",
        "safety_identifier": "u",
        "verbosity": "low",
        "stream_options": None,
    },
}


@pytest.mark.parametrize("name", sorted(CLIENT_BODIES))
def test_bodies_that_client_libraries_send_are_accepted(gw, name):
    body = CLIENT_BODIES[name]
    r = post(gw, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    if body.get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_openai_client_accepts_the_ignored_fields(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=2,
        user="u",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        parallel_tool_calls=True,
        tools=[WEATHER_TOOL],
        reasoning_effort="low",
    )
    assert resp.choices[0].message.content == expected_output(2)
    assert json.loads(resp.model_dump_json())["choices"][0]["finish_reason"] == "length"


def test_embeddings_and_batches_bodies_refuse_unknown_fields_too(backends, tmp_path):
    gw = RunningGateway(backends, file_storage_path=str(tmp_path))
    try:
        embedding = {"input": "x", "dimensionz": 3}
        error = assert_400(post(gw, "/v1/embeddings", embedding), "dimensionz")
        assert error["message"] == "Unrecognized request argument supplied: dimensionz"
        # user is accepted (this text-generation server then refuses embeddings for its own reason)
        refusal = post(gw, "/v1/embeddings", {"input": "x", "user": "u"}).json()["error"]
        assert "--is-embedding" in refusal["message"]
        batch = {
            "input_file_id": "file-1",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        assert_400(post(gw, "/v1/batches", {**batch, "priority": 1}), "priority")
        assert post(gw, "/v1/batches", batch).status_code == 404  # no such file: past the body
    finally:
        gw.close()


def test_an_assistant_function_call_reaches_the_template_as_a_tool_call():
    from radixserve.gateway.api.openai_routes import chat_conversation

    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    req = ChatCompletionRequest.model_validate(
        {"messages": [*MESSAGES, {"role": "assistant", "content": None, "function_call": call}]}
    )
    [shown] = json.loads(chat_conversation(req).messages[1].tool_calls_json)
    assert shown["type"] == "function" and shown["function"] == call
