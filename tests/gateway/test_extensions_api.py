"""Issue 18 item 6: the peers' extensions over the fake backends: /tokenize, /detokenize, /version,
stop_regex, vLLM's structured_outputs, return_token_ids, truncate_prompt_tokens and continuous usage."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.gateway.fakes import (
    CONTEXT_LENGTH,
    MESSAGES,
    MODEL,
    OUTPUT_TEXT,
    VOCAB_SIZE,
    RunningGateway,
    encode,
    expected_output,
    render_chat,
)
from radixserve.v1 import common_pb2


@pytest.fixture(scope="module")
def gw(backends):
    running = RunningGateway(backends)
    yield running
    running.close()


def post(gw, path: str, body: dict) -> httpx.Response:
    return httpx.post(gw.base_url + path, json=body, timeout=30)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def error(response: httpx.Response, param: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    err = response.json()["error"]
    assert param is None or err["param"] == param, err
    return err


def stream(gw, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", gw.base_url + path, json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        frames = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


# ---- /tokenize, /detokenize, /version ----


@pytest.mark.parametrize("path", ["/tokenize", "/v1/tokenize"])
def test_tokenize_a_prompt_as_vllm_answers(gw, path):
    assert ok(post(gw, path, {"model": MODEL, "prompt": "Hi!"})) == {
        "count": 3,
        "max_model_len": CONTEXT_LENGTH,
        "tokens": encode("Hi!"),
    }


def test_tokenize_a_batch_of_prompts_as_sglang_answers(gw):
    assert ok(post(gw, "/tokenize", {"prompt": ["a", "bc"]})) == {
        "count": [1, 2],
        "max_model_len": CONTEXT_LENGTH,
        "tokens": [encode("a"), encode("bc")],
    }


def test_tokenize_messages_through_the_chat_template_with_token_strings(gw):
    body = ok(post(gw, "/tokenize", {"messages": MESSAGES, "return_token_strs": True}))
    rendered = render_chat(
        common_pb2.ChatConversation(
            messages=[common_pb2.ChatMessage(role="user", content="Hi")], add_generation_prompt=True
        )
    )
    assert body["tokens"] == encode(rendered) and body["count"] == len(rendered)
    assert "".join(body["token_strs"]) == rendered


@pytest.mark.parametrize(
    "body,param",
    [
        ({}, "prompt"),
        ({"prompt": "a", "messages": MESSAGES}, "prompt"),
        ({"prompt": 5}, None),
    ],
)
def test_tokenize_refuses_a_bad_body(gw, body, param):
    error(post(gw, "/tokenize", body), param)


def test_tokenize_for_another_model_is_a_404(gw):
    assert post(gw, "/tokenize", {"model": "other", "prompt": "a"}).status_code == 404


@pytest.mark.parametrize("path", ["/detokenize", "/v1/detokenize"])
def test_detokenize_answers_prompt_and_text(gw, path):
    assert ok(post(gw, path, {"tokens": encode("Hello")})) == {"prompt": "Hello", "text": "Hello"}
    batch = ok(post(gw, path, {"tokens": [encode("a"), encode("bc")]}))
    assert batch == {"prompt": ["a", "bc"], "text": ["a", "bc"]}


@pytest.mark.parametrize("tokens", [[-1], [VOCAB_SIZE], ["x"]])
def test_detokenize_refuses_ids_outside_the_vocabulary(gw, tokens):
    error(post(gw, "/detokenize", {"tokens": tokens}))


def test_version_is_the_package_version(gw):
    from importlib import metadata

    assert httpx.get(gw.base_url + "/version").json() == {"version": metadata.version("radixserve")}


def test_the_model_card_root_is_the_served_name(gw):
    assert httpx.get(gw.base_url + "/v1/models").json()["data"][0]["root"] == MODEL
    assert httpx.get(gw.base_url + f"/v1/models/{MODEL}").json()["root"] == MODEL


# ---- stop_regex ----

BROWN = "The quick "  # OUTPUT_TEXT before "brown"


def test_stop_regex_ends_chat_completion_and_generate(gw):
    chat = ok(
        post(
            gw,
            "/v1/chat/completions",
            {"messages": MESSAGES, "max_tokens": 40, "stop_regex": r"b[a-z]+n"},
        )
    )
    choice = chat["choices"][0]
    assert choice["message"]["content"] == BROWN and choice["finish_reason"] == "stop"
    assert choice["matched_stop"] == r"b[a-z]+n"
    text = ok(
        post(
            gw, "/v1/completions", {"prompt": "x", "max_tokens": 40, "stop_regex": [r"\d", r"qu?i"]}
        )
    )
    assert text["choices"][0]["text"] == "The "
    native = ok(
        post(
            gw,
            "/generate",
            {"text": "x", "sampling_params": {"max_new_tokens": 40, "stop_regex": r"f.x"}},
        )
    )
    assert native["text"] == "The quick brown " and native["meta_info"]["finish_reason"] == {
        "type": "stop",
        "matched": r"f.x",
    }


def test_stop_regex_when_streamed(gw):
    chunks = stream(
        gw,
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 40, "stop_regex": r"b[a-z]+n"},
    )
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == BROWN and chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stop_regex", ["(", "a*", ["a", "b", "c", "d", "e"], "x" * 600])
def test_a_bad_stop_regex_is_a_400(gw, stop_regex):
    error(post(gw, "/v1/completions", {"prompt": "x", "stop_regex": stop_regex}), "stop_regex")
    error(
        post(gw, "/generate", {"text": "x", "sampling_params": {"stop_regex": stop_regex}}),
        "sampling_params.stop_regex",
    )


# ---- structured_outputs ----


@pytest.mark.parametrize(
    "so,kind,spec",
    [
        ({"choice": ["yes", 'no "way"']}, "ebnf", 'root ::= "yes" | "no \\"way\\""'),
        ({"json": {"type": "object"}}, "json_schema", '{"type": "object"}'),
        ({"json": '{"type": "string"}'}, "json_schema", '{"type": "string"}'),
        ({"regex": "[ab]+"}, "regex", "[ab]+"),
        ({"grammar": 'root ::= "x"'}, "ebnf", 'root ::= "x"'),
        ({"json_object": True}, "json_object", True),
    ],
)
def test_structured_outputs_reach_the_constraint(gw, backends, so, kind, spec):
    body = ok(
        post(
            gw,
            "/v1/chat/completions",
            {"messages": MESSAGES, "max_tokens": 2, "structured_outputs": so},
        )
    )
    sampling = backends.scheduler.requests[body["id"]].sampling
    assert sampling.WhichOneof("constraint") == kind and getattr(sampling, kind) == spec


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"regex": "a"}, "regex": "b"}, "regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"json": True}}, "structured_outputs.json"),
    ],
)
def test_more_than_one_constraint_or_an_empty_choice_is_a_400(gw, extra, param):
    error(post(gw, "/v1/completions", {"prompt": "x", **extra}), param)


# ---- return_token_ids ----


def test_return_token_ids_without_streaming(gw):
    text = ok(
        post(gw, "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "return_token_ids": True})
    )
    choice = text["choices"][0]
    assert choice["prompt_token_ids"] == encode("Hi") and choice["token_ids"] == encode(
        OUTPUT_TEXT[:5]
    )
    chat = ok(
        post(
            gw,
            "/v1/chat/completions",
            {"messages": MESSAGES, "max_tokens": 4, "n": 2, "return_token_ids": True},
        )
    )
    assert chat["prompt_token_ids"] == encode(
        render_chat(
            common_pb2.ChatConversation(
                messages=[common_pb2.ChatMessage(role="user", content="Hi")],
                add_generation_prompt=True,
            )
        )
    )
    assert [c["token_ids"] for c in chat["choices"]] == [encode(OUTPUT_TEXT[:4])] * 2
    plain = ok(post(gw, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}))
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]


def test_return_token_ids_when_streamed(gw):
    chunks = stream(
        gw, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 7, "return_token_ids": True}
    )
    for index, prompt in enumerate(["a", "b"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["prompt_token_ids"] == encode(prompt)
        assert all("prompt_token_ids" not in c for c in mine[1:])
        assert sum((c["token_ids"] for c in mine), []) == encode(expected_output(7))
    chunks = stream(
        gw,
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 6, "return_token_ids": True},
    )
    assert "prompt_token_ids" in chunks[0] and all("prompt_token_ids" not in c for c in chunks[1:])
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == encode(expected_output(6))


# ---- truncate_prompt_tokens ----


def test_truncate_prompt_tokens_keeps_the_last_tokens(gw, backends):
    body = ok(
        post(
            gw,
            "/v1/completions",
            {"prompt": "abcdef", "max_tokens": 2, "truncate_prompt_tokens": 3},
        )
    )
    assert body["usage"]["prompt_tokens"] == 3
    assert list(backends.scheduler.requests[body["id"]].input_ids) == encode("def")
    chat = ok(
        post(
            gw,
            "/v1/chat/completions",
            {"messages": MESSAGES, "max_tokens": 2, "truncate_prompt_tokens": 4},
        )
    )
    assert chat["usage"]["prompt_tokens"] == 4
    whole = ok(
        post(
            gw,
            "/v1/completions",
            {"prompt": "x" * 10, "max_tokens": 2, "truncate_prompt_tokens": -1},
        )
    )
    assert whole["usage"]["prompt_tokens"] == 10


@pytest.mark.parametrize("keep", [0, -2, CONTEXT_LENGTH + 1])
def test_truncate_prompt_tokens_out_of_range_is_a_400(gw, keep):
    error(
        post(
            gw,
            "/v1/completions",
            {"prompt": "abc", "max_tokens": 2, "truncate_prompt_tokens": keep},
        ),
        "truncate_prompt_tokens",
    )


# ---- continuous_usage_stats ----


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 6}),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6}),
    ],
)
def test_continuous_usage_stats_count_up_on_every_chunk(gw, path, body):
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = stream(gw, path, {**body, "stream_options": options})
    *content, final = chunks
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 6
    counted = [c["usage"]["completion_tokens"] for c in content if c.get("usage")]
    assert counted and counted == sorted(counted) and counted[-1] <= 6
    prompt = final["usage"]["prompt_tokens"]
    assert all(c["usage"]["prompt_tokens"] == prompt for c in content if c.get("usage"))
