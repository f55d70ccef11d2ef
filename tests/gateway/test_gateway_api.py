"""The gateway against fake tokenizer/scheduler/detokenizer gRPC services: OpenAI REST, native, gRPC."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import httpx
import openai
import pytest

from radixserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.fakes import (
    CONTEXT_LENGTH,
    EOS_MARKER,
    EXECUTOR_FAIL_MARKER,
    FAIL_MARKER,
    MESSAGES,
    MODEL,
    MODEL_PATH,
    KV_BYTES_PER_TOKEN,
    POISON,
    RunningGateway,
    expected_output,
    render_chat,
    wait_until,
)

SSE_BODY = re.compile(rb"^(data: \{[^\n]*\}\n\n)+data: \[DONE\]\n\n$")


@pytest.fixture(scope="module")
def gw(backends):
    running = RunningGateway(backends)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(gw):
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0, timeout=30)


def sse_events(body: bytes) -> list:
    assert SSE_BODY.match(body), body
    return [json.loads(frame[len(b"data: ") :]) for frame in body.split(b"\n\n")[:-2]]


# ---- OpenAI chat and completions ----


def test_chat_non_stream_and_stream_agree(client, backends):
    full = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0
    )
    assert (
        full.object == "chat.completion" and full.id.startswith("chatcmpl-") and full.model == MODEL
    )
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == expected_output(20)
    assert full.choices[0].finish_reason == "length"
    prompt_len = len(
        render_chat(
            common_pb2.ChatConversation(
                messages=[common_pb2.ChatMessage(role="user", content="Hi")],
                add_generation_prompt=True,
            )
        )
    )
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == (
        prompt_len,
        20,
        prompt_len + 20,
    )
    assert full.usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == full.choices[0].message.content
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert (
        chunks[-1].usage.prompt_tokens_details.cached_tokens == prompt_len - 1
    )  # same prompt again
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_sse_framing_is_openais(gw):
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", gw.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    events = sse_events(raw)
    first, *middle, finish, usage = events
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert all(e["id"] == first["id"] and e["usage"] is None for e in [first, *middle, finish])
    content = [e["choices"][0]["delta"]["content"] for e in [*middle, finish]]
    assert "".join(content) == expected_output(7) and all(content)
    assert all(e["choices"][0]["finish_reason"] is None for e in middle)
    # The last token's chunk carries finish_reason (no extra empty chunk), as SGLang and vLLM.
    assert finish["choices"][0]["delta"] == {"content": expected_output(7)[6:]}
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 7
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 7

    body.pop("stream_options")
    with httpx.stream("POST", gw.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = sse_events(r.read())
    assert (
        all("usage" not in e for e in events)
        and events[-1]["choices"][0]["finish_reason"] == "length"
    )


def test_completions_prompt_shapes_and_streaming(client, gw):
    plain = client.completions.create(model=MODEL, prompt="Once", max_tokens=12)
    assert plain.object == "text_completion" and plain.id.startswith("cmpl-")
    assert (
        plain.choices[0].text == expected_output(12) and plain.choices[0].finish_reason == "length"
    )
    assert plain.usage.prompt_tokens == 4
    assert client.completions.create(model=MODEL, prompt=["Once"], max_tokens=12).choices[
        0
    ].text == expected_output(12)
    ids = client.completions.create(model=MODEL, prompt=[79, 110, 99, 101], max_tokens=12)
    assert ids.choices[0].text == expected_output(12) and ids.usage.prompt_tokens == 4
    assert (
        client.completions.create(model=MODEL, prompt=[[79, 110]], max_tokens=3).usage.prompt_tokens
        == 2
    )

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Once",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    batch = client.completions.create(model=MODEL, prompt=["a", "bc"], max_tokens=2)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [expected_output(2)] * 2
    assert batch.usage.prompt_tokens == 3 and batch.usage.completion_tokens == 4
    r = httpx.post(gw.base_url + "/v1/completions", json={"prompt": [], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_max_tokens_defaults_to_16_for_completions_and_the_rest_of_the_context_for_chat(client):
    resp = client.completions.create(model=MODEL, prompt="x" * 200)
    assert resp.usage.completion_tokens == 16  # OpenAI's, SGLang's and vLLM's default
    assert resp.choices[0].finish_reason == "length"
    resp = client.completions.create(model=MODEL, prompt="x" * (CONTEXT_LENGTH - 6))
    assert resp.usage.completion_tokens == 6  # no more than the context leaves
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x" * 200}]
    )
    assert chat.usage.completion_tokens == CONTEXT_LENGTH - chat.usage.prompt_tokens
    assert chat.choices[0].finish_reason == "length"


def test_stop_string_ends_the_request_and_aborts_the_scheduler(client, backends):
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, stop=["fox", "zzz"]
    )
    assert resp.choices[0].message.content == "The quick brown "
    assert resp.choices[0].finish_reason == "stop"
    assert wait_until(lambda: resp.id in backends.scheduler.cancelled)

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=40, stop="own f", stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The quick br"
    assert chunks[-1].choices[0].finish_reason == "stop"

    text = client.completions.create(model=MODEL, prompt="a", max_tokens=40, stop="lazy")
    assert text.choices[0].text == "The quick brown fox jumps over the "


def test_eos_and_stop_token_ids(gw, client):
    resp = client.completions.create(model=MODEL, prompt=EOS_MARKER, max_tokens=30)
    assert resp.choices[0].text == expected_output(5) and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 6
    ignored = client.completions.create(
        model=MODEL, prompt=EOS_MARKER, max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == 8
    r = httpx.post(
        gw.base_url + "/generate",
        json={"text": "a", "sampling_params": {"max_new_tokens": 30, "stop_token_ids": [ord("k")]}},
    )
    assert r.json()["text"] == "The quic"  # the stop token's text is not shown (as SGLang, vLLM)
    assert r.json()["meta_info"]["finish_reason"] == {"type": "stop", "matched": ord("k")}


def test_logprobs_in_openai_shapes(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    assert [c.token for c in content] == list("The")
    assert content[0].logprob == -0.25 and content[0].bytes == [ord("T")]
    assert [t.token for t in content[0].top_logprobs] == ["T", "?"]

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True, stream=True
        )
    )
    assert [
        c.token
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for c in ch.choices[0].logprobs.content
    ] == list("The")

    text = client.completions.create(model=MODEL, prompt="a", max_tokens=3, logprobs=1)
    assert text.choices[0].logprobs.tokens == list("The")
    assert text.choices[0].logprobs.token_logprobs == [-0.25] * 3
    assert text.choices[0].logprobs.top_logprobs[0] == {"T": -0.25}
    assert text.choices[0].logprobs.text_offset == [0, 1, 2]


# ---- bad input ----

BAD_CHAT_BODIES = [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    (json.dumps({"model": MODEL}), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": "hello"}), 400, "messages"),
    (
        json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
        400,
        "messages.0.role",
    ),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 0}), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": "many"}), 400, "max_tokens"),
    (
        json.dumps({"model": MODEL, "messages": MESSAGES, "max_completion_tokens": -3}),
        400,
        "max_completion_tokens",
    ),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": -1}), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": 2.5}), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "top_p": 1.5}), 400, "top_p"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "top_p": 0}), 400, "top_p"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "n": 0}), 400, "n"),
    (json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 10**6}), 400, "messages"),
    (json.dumps({"model": "no-such-model", "messages": MESSAGES}), 404, "model"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": POISON}]}), 400, None),
    (
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": POISON}], "stream": True}
        ),
        400,
        None,
    ),
]


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(gw, client):
    for raw, status, param in BAD_CHAT_BODIES:
        r = httpx.post(
            gw.base_url + "/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert r.status_code == status, (raw, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert err["param"] == param, (raw, err)
        assert "Traceback" not in r.text
    too_long = httpx.post(
        gw.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 10**6},
    ).json()["error"]
    assert too_long["code"] == "context_length_exceeded"
    assert too_long["message"].startswith(
        f"This model's maximum context length is {CONTEXT_LENGTH} tokens."
    )
    assert (
        httpx.post(
            gw.base_url + "/v1/chat/completions", json={"model": "nope", "messages": MESSAGES}
        ).json()["error"]["code"]
        == "model_not_found"
    )
    r = httpx.post(
        gw.base_url + "/v1/completions", json={"model": MODEL, "prompt": [-5], "max_tokens": 2}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.get(gw.base_url + "/v1/nothing-here").json()["error"]["message"] == "Not Found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=-1)
    assert (
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        .choices[0]
        .message.content
    )


def test_backend_failure_mid_stream(gw):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": FAIL_MARKER}],
        "max_tokens": 50,
    }
    r = httpx.post(gw.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
    with httpx.stream(
        "POST", gw.base_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30
    ) as r:
        assert r.status_code == 200
        events = sse_events(r.read())
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["error"]["code"] == "service_unavailable" and "Traceback" not in json.dumps(
        events
    )


def test_the_failed_stage_is_named_from_the_scheduler_error_detail_not_its_message(gw):
    """The fake's executor failure has a message that does not start with "executor"; its failed_stage names it.
    FAIL_MARKER's failure is the scheduler's own, though its message mentions the executor."""
    executor_failed = {
        "error": {
            "message": "the executor service failed while running this request; retry it",
            "type": "service_unavailable_error",
            "param": None,
            "code": "service_unavailable",
        }
    }
    scheduler_failed = {
        "error": {
            "message": "the scheduler service is unavailable",
            "type": "service_unavailable_error",
            "param": None,
            "code": "service_unavailable",
        }
    }
    for marker, expected in (
        (EXECUTOR_FAIL_MARKER, executor_failed),
        (FAIL_MARKER, scheduler_failed),
    ):
        body = {"model": MODEL, "messages": [{"role": "user", "content": marker}], "max_tokens": 50}
        r = httpx.post(gw.base_url + "/v1/chat/completions", json=body, timeout=30)
        assert (r.status_code, r.json()) == (503, expected)
        with httpx.stream(
            "POST", gw.base_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30
        ) as r:
            events = sse_events(r.read())
        assert events[-1] == expected


# ---- disconnects ----


def test_client_disconnect_mid_stream_cancels_the_scheduler_call(gw, backends):
    backends.scheduler.step_delay = 0.02
    try:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", gw.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            request_id = json.loads(next(lines)[len("data: ") :])["id"]
            seen = 1
            for line in lines:
                seen += line.startswith("data: ")
                if seen >= 4:
                    break
        assert wait_until(lambda: request_id in backends.scheduler.cancelled), (
            backends.scheduler.cancelled
        )
        assert request_id not in backends.scheduler.completed

        started = len(backends.scheduler.started)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                gw.base_url + "/v1/completions",
                json={"prompt": "slow", "max_tokens": 200},
                timeout=0.3,
            )
        rid = backends.scheduler.started[started]
        assert wait_until(lambda: rid in backends.scheduler.cancelled), backends.scheduler.cancelled

        async def cancel_grpc_stream():
            async with grpc.aio.insecure_channel(gw.grpc_addr) as channel:
                call = gateway_pb2_grpc.GatewayStub(channel).Generate(
                    gateway_pb2.GatewayGenerateRequest(
                        text="x",
                        request_id="grpc-cancelled",
                        stopping=common_pb2.StoppingCriteria(max_new_tokens=200),
                    )
                )
                await call.read()
                await call.read()
                call.cancel()

        asyncio.run(cancel_grpc_stream())
        assert wait_until(lambda: "grpc-cancelled" in backends.scheduler.cancelled)
    finally:
        backends.scheduler.step_delay = 0.002
    assert wait_until(lambda: not backends.scheduler.active)


# ---- native endpoints ----


def test_native_generate(gw, backends):
    r = httpx.post(
        gw.base_url + "/generate",
        json={"text": "Hello", "sampling_params": {"max_new_tokens": 9, "temperature": 0}},
    )
    assert r.status_code == 200
    out = r.json()
    assert out["text"] == expected_output(9) and out["output_ids"] == [
        ord(c) for c in expected_output(9)
    ]
    meta = out["meta_info"]
    assert (
        meta["prompt_tokens"] == 5 and meta["completion_tokens"] == 9 and meta["cached_tokens"] >= 0
    )
    assert meta["finish_reason"]["type"] == "length" and meta["id"]

    r = httpx.post(
        gw.base_url + "/generate",
        json={"input_ids": [72, 105], "sampling_params": {"max_new_tokens": 30, "stop": "brown"}},
    )
    assert r.json()["text"] == "The quick " and r.json()["meta_info"]["finish_reason"] == {
        "type": "stop",
        "matched": "brown",
    }

    with httpx.stream(
        "POST",
        gw.base_url + "/generate",
        json={"text": "Hello", "stream": True, "sampling_params": {"max_new_tokens": 9}},
    ) as r:
        events = sse_events(r.read())
    texts = [e["text"] for e in events]
    assert texts[-1] == expected_output(9) and all(texts[-1].startswith(t) for t in texts)
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])

    assert httpx.post(gw.base_url + "/generate", json={"sampling_params": {}}).status_code == 400
    assert httpx.post(gw.base_url + "/generate", json={"text": ["a", "b"]}).status_code == 400


def test_models_and_info_endpoints(gw, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = httpx.get(gw.base_url + "/v1/models").json()["data"][0]
    assert card == {
        "id": MODEL,
        "object": "model",
        "created": card["created"],
        "owned_by": "radixserve",
        "root": MODEL,  # the served name, as vLLM (not the path)
        "parent": None,
        "max_model_len": CONTEXT_LENGTH,
    }
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(gw.base_url + "/v1/models/other").status_code == 404
    info = httpx.get(gw.base_url + "/get_model_info").json()
    assert (
        info["model_path"] == MODEL_PATH
        and info["is_generation"] is True
        and info["tokenizer_path"]
        and info["kv_cache_dtype"] == "fp8_e5m2"
        and info["kv_bytes_per_token"] == KV_BYTES_PER_TOKEN
    )
    server = httpx.get(gw.base_url + "/get_server_info").json()
    assert (
        server["served_model_name"] == MODEL
        and server["scheduler"]["context_length"] == CONTEXT_LENGTH
    )
    assert server["scheduler"]["config"] == {"schedule_policy": "fcfs"}
    assert httpx.post(gw.base_url + "/flush_cache").json() == {"freed_tokens": 7}


# ---- public gRPC API ----


def test_grpc_gateway_api(gw, backends):
    async def calls():
        async with grpc.aio.insecure_channel(gw.grpc_addr) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            chat = common_pb2.ChatConversation(
                messages=[common_pb2.ChatMessage(role="user", content="Hi")],
                add_generation_prompt=True,
            )
            pieces = [
                m
                async for m in stub.Generate(
                    gateway_pb2.GatewayGenerateRequest(
                        chat=chat,
                        sampling=common_pb2.SamplingParams(temperature=0),
                        stopping=common_pb2.StoppingCriteria(max_new_tokens=60),
                        stop=["lazy"],
                        skip_special_tokens=True,
                        request_id="grpc-1",
                    )
                )
            ]
            ids_only = [
                m
                async for m in stub.Generate(
                    gateway_pb2.GatewayGenerateRequest(
                        input_ids=common_pb2.TokenIds(ids=[1, 2, 3]),
                        stopping=common_pb2.StoppingCriteria(max_new_tokens=4),
                    )
                )
            ]
            models = await stub.ListModels(gateway_pb2.GatewayListModelsRequest())
            health = await stub.Health(gateway_pb2.GatewayHealthRequest())
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                [
                    m
                    async for m in stub.Generate(
                        gateway_pb2.GatewayGenerateRequest(model="other", text="x")
                    )
                ]
            with pytest.raises(grpc.aio.AioRpcError) as too_long:
                [
                    m
                    async for m in stub.Generate(
                        gateway_pb2.GatewayGenerateRequest(
                            text="x", stopping=common_pb2.StoppingCriteria(max_new_tokens=10**6)
                        )
                    )
                ]
            return pieces, ids_only, models, health, missing.value.code(), too_long.value.code()

    pieces, ids_only, models, health, missing, too_long = asyncio.run(calls())
    assert "".join(p.text for p in pieces) == "The quick brown fox jumps over the "
    assert all(p.request_id == "grpc-1" for p in pieces)
    last = pieces[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and last.matched_stop == "lazy"
    assert last.usage.completion_tokens >= 35 and last.usage.prompt_tokens > 0
    assert "grpc-1" in backends.scheduler.cancelled or wait_until(
        lambda: "grpc-1" in backends.scheduler.cancelled
    )
    assert [t for p in ids_only for t in p.token_ids] == [ord(c) for c in "The "]
    assert ids_only[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [(m.id, m.context_length, m.root) for m in models.models] == [
        (MODEL, CONTEXT_LENGTH, MODEL_PATH)
    ]
    assert health.healthy
    assert (missing, too_long) == (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


# ---- health (last: stops the fake scheduler) ----


def test_native_stream_without_tokenizer_sends_every_token(backends):
    # --skip-tokenizer-init: no text ever, so each chunk must still carry the ids that arrived
    # (a benchmark's TTFT and ITL depend on it).
    running = RunningGateway(backends, skip_tokenizer_init=True)
    try:
        with httpx.stream(
            "POST",
            running.base_url + "/generate",
            json={
                "input_ids": [72, 105],
                "stream": True,
                "sampling_params": {"max_new_tokens": 5, "ignore_eos": True},
            },
        ) as r:
            assert r.status_code == 200
            events = sse_events(r.read())
    finally:
        running.close()
    counts = [len(e["output_ids"]) for e in events]
    # the fake scheduler sends tokens in small groups; before the fix there was one final chunk only
    assert counts[-1] == 5 and len(events) >= 3
    assert counts == sorted(counts) and counts[0] >= 1
    assert all(e["text"] == "" for e in events)


# Stops the fake scheduler: keep it the module's last test.
def test_health_is_a_real_generation_and_fails_without_the_scheduler(gw, backends):
    before = len(backends.scheduler.completed)
    assert httpx.get(gw.base_url + "/health", timeout=30).status_code == 200
    assert len(backends.scheduler.completed) == before + 1
    backends.stop_scheduler()
    r = httpx.get(gw.base_url + "/health", timeout=30)
    assert r.status_code == 503 and r.json()["error"]["message"]
    r = httpx.post(
        gw.base_url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}
    )
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"

    async def grpc_health():
        async with grpc.aio.insecure_channel(gw.grpc_addr) as channel:
            return await gateway_pb2_grpc.GatewayStub(channel).Health(
                gateway_pb2.GatewayHealthRequest()
            )

    assert not asyncio.run(grpc_health()).healthy
