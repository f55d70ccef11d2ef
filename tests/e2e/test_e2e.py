"""End to end: the five service processes, the real SmolLM2-135M-Instruct, the official openai client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

import grpc
import httpx
import pytest

from radixserve.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from radixserve.common.model_files import resolve_model_path
from tests.stack import (
    FIXED_PROMPT,
    MODEL,
    openai_client,
    running_stack,
    scheduler_info,
    wait_idle_and_check_no_leak,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # float32 and the GGUF dequantized (--quantization unquant; natively its activations are quantized
    # to int8) so greedy tokens can be compared exactly with HF transformers in float32
    with running_stack(
        tmp_path_factory.mktemp("stack"),
        "--dtype",
        "float32",
        "--quantization",
        "unquant",
        "--max-total-tokens",
        "20000",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack):
    return openai_client(stack)


def test_chat_capital_of_france(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=30,
    )
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens > 10 and resp.usage.completion_tokens > 0


def test_greedy_tokens_equal_hf_transformers(stack):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(None)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(FIXED_PROMPT)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32
        )
    expected = out[0, len(ids) :].tolist()
    r = httpx.post(
        stack.base_url + "/generate",
        timeout=120,
        json={
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 32, "temperature": 0, "ignore_eos": True},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == expected


def test_streamed_deltas_join_to_non_streamed_text(client):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        temperature=0,
        max_tokens=40,
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert len(finishes) == 1
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])

    completion = client.completions.create(
        model=MODEL, prompt=FIXED_PROMPT, temperature=0, max_tokens=24
    )
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt=FIXED_PROMPT, temperature=0, max_tokens=24, stream=True
        )
    )
    assert streamed == completion.choices[0].text


def test_sixteen_concurrent_requests_complete(stack, client):
    def one(i):
        return client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 10}."}],
            temperature=0.7,
            seed=i,
            max_tokens=32,
        )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    assert all(r.usage.completion_tokens > 0 for r in results)
    wait_idle_and_check_no_leak(stack)


def test_repeated_long_prompt_reports_cached_tokens(client):
    document = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(120))
    messages = [{"role": "user", "content": document + "\nWhich colour is item 7?"}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=8
    )
    second = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=8
    )
    assert first.usage.prompt_tokens > 500
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content


def test_disconnected_stream_leaves_no_leaked_kv(stack):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 2000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break
    assert scheduler_info(stack).running_requests <= 1
    info = wait_idle_and_check_no_leak(stack)
    assert info.cached_tokens > 0


def test_bad_input_gets_openai_errors_and_server_keeps_serving(stack, client):
    url = stack.base_url + "/v1/chat/completions"
    good = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    cases = [
        ("{not json", 400),
        (json.dumps({"model": MODEL}), 400),
        (json.dumps({**good, "max_tokens": 0}), 400),
        (json.dumps({**good, "temperature": -1}), 400),
        (json.dumps({**good, "top_p": 1.5}), 400),
        (json.dumps({**good, "messages": "hello"}), 400),
        (json.dumps({**good, "max_tokens": 10**6}), 400),
        (json.dumps({**good, "model": "no-such-model"}), 404),
    ]
    for raw, status in cases:
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (raw, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"} and err["message"], err
    assert client.chat.completions.create(**good).choices[0].message.content is not None
    wait_idle_and_check_no_leak(stack)


def test_health_and_model_listing(stack, client):
    assert httpx.get(stack.base_url + "/health", timeout=60).status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]
    info = httpx.get(stack.base_url + "/get_model_info", timeout=10).json()
    assert info["model_path"]


def test_direct_grpc_clients(stack):
    async def gateway_text_api():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            req = gateway_pb2.GatewayGenerateRequest(
                chat=common_pb2.ChatConversation(
                    messages=[
                        common_pb2.ChatMessage(
                            role="user", content="What is the capital of France?"
                        )
                    ],
                    add_generation_prompt=True,
                ),
                sampling=common_pb2.SamplingParams(temperature=0),
                stopping=common_pb2.StoppingCriteria(max_new_tokens=30),
                skip_special_tokens=True,
            )
            pieces = [m async for m in stub.Generate(req)]
            models = await stub.ListModels(gateway_pb2.GatewayListModelsRequest())
            health = await stub.Health(gateway_pb2.GatewayHealthRequest())
            return pieces, models, health

    pieces, models, health = asyncio.run(gateway_text_api())
    assert "Paris" in "".join(p.text for p in pieces)
    assert pieces[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert models.models[0].id == MODEL and health.healthy

    with stack.grpc_channel(stack.scheduler_addr) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        req = scheduler_pb2.SchedulerGenerateRequest(
            request_id="direct-1",
            input_ids=[1, 504, 3458, 282],
            sampling=common_pb2.SamplingParams(temperature=0),
            stopping=common_pb2.StoppingCriteria(max_new_tokens=8, ignore_eos=True),
        )
        msgs = list(stub.Generate(req, timeout=60))
    tokens = [t for m in msgs for t in m.token_ids]
    assert len(tokens) == 8
    assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert msgs[-1].usage.prompt_tokens == 4 and msgs[-1].usage.completion_tokens == 8
