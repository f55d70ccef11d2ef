"""Aborts against the real scheduler (fake executor, fake tokenizer/detokenizer) behind the gateway:
an abort storm of cut streams (SGLang's test_abort pattern), POST /abort_request, --request-timeout and
--max-queued-requests; after each, the scheduler is idle, with no KV in use and its leak check passing."""

from __future__ import annotations

import asyncio
import json

from tests.gateway.real_scheduler import (
    MESSAGES,
    MODEL,
    gateway_stack,
    post_cut,
    read_stream,
    run,
    sse_payloads,
)

STORM_REQUESTS = [
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 2048, "stream": True},
    ),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2048, "stream": True, "n": 2},
    ),
    (
        "/generate",
        {"text": "Once upon a time", "stream": True, "sampling_params": {"max_new_tokens": 2048}},
    ),
    (
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": MESSAGES,
            "max_tokens": 2048,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
]


def test_abort_storm_of_cut_streams_leaves_the_scheduler_idle_without_leaks(tmp_path):
    async def main():
        async with gateway_stack(tmp_path) as stack:
            cut = [
                read_stream(
                    stack.client, *STORM_REQUESTS[i % len(STORM_REQUESTS)], cut_when=sse_payloads
                )
                for i in range(16)
            ]
            cut_plain = [
                post_cut(stack.client, *STORM_REQUESTS[i], seconds=0.5)
                for i in range(len(STORM_REQUESTS))
            ]
            results = (await asyncio.gather(*cut, *cut_plain))[:16]
            assert all(sse_payloads(lines) for lines in results)  # each cut mid-generation
            assert not any("[DONE]" in line for lines in results for line in lines)
            await stack.assert_idle_without_leaks()
            # and the server still serves
            r = await stack.client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4}
            )
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
            await stack.assert_idle_without_leaks()

    run(main())


def test_abort_request_by_id_and_abort_all_end_responses_with_finish_reason_abort(tmp_path):
    async def main():
        async with gateway_stack(tmp_path) as stack:
            client = stack.client
            victim = {
                "text": "Hello",
                "rid": "victim",
                "stream": True,
                "sampling_params": {"max_new_tokens": 2048},
            }
            async with client.stream("POST", "/generate", json=victim) as r:
                lines = r.aiter_lines()
                first = json.loads((await anext(lines))[len("data: ") :])
                assert (
                    first["meta_info"]["id"] == "victim"
                    and first["meta_info"]["finish_reason"] is None
                )
                aborted = await client.post("/abort_request", json={"rid": "victim"})
                assert aborted.status_code == 200 and aborted.json() == {"aborted": 1}
                rest = [line async for line in lines]
            events = sse_payloads(rest)
            assert events[-1]["meta_info"]["finish_reason"] == {"type": "abort"}
            assert events[-1]["meta_info"]["completion_tokens"] < 2048 and rest[-2:] == [
                "data: [DONE]",
                "",
            ]

            # An OpenAI response's id aborts all of its choices.
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": MESSAGES,
                    "max_tokens": 2048,
                    "stream": True,
                    "n": 2,
                },
            ) as r:
                lines = r.aiter_lines()
                response_id = json.loads((await anext(lines))[len("data: ") :])["id"]
                assert (await client.post("/abort_request", json={"rid": response_id})).json()[
                    "aborted"
                ] >= 1
                chunks = sse_payloads([line async for line in lines])
            reasons = {
                c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
                for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"]
            }
            assert reasons == {0: "abort", 1: "abort"}

            # abort_all reaches a non-streamed request, whose response still goes out.
            pending = asyncio.create_task(
                client.post(
                    "/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 2048}
                )
            )
            await stack.wait_for(lambda i: i["running_requests"] == 1)
            assert (await client.post("/abort_request", json={"abort_all": True})).json()[
                "aborted"
            ] == 1
            resp = await pending
            assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "abort"
            assert 0 < resp.json()["usage"]["completion_tokens"] < 2048

            missing = await client.post("/abort_request", json={"rid": "no-such-request"})
            assert (
                missing.status_code == 404
                and missing.json()["error"]["code"] == "request_not_found"
            )
            assert (await client.post("/abort_request", json={})).status_code == 400
            await stack.assert_idle_without_leaks()

    run(main())


def test_request_timeout_aborts_streamed_and_non_streamed_responses(tmp_path):
    async def main():
        async with gateway_stack(tmp_path, request_timeout=0.5) as stack:
            loop = asyncio.get_running_loop()
            started = loop.time()
            resp = await stack.client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 2048}
            )
            assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "abort"
            assert 0.5 <= loop.time() - started < 5
            chat = sse_payloads(
                await read_stream(
                    stack.client,
                    "/v1/chat/completions",
                    {"model": MODEL, "messages": MESSAGES, "max_tokens": 2048, "stream": True},
                )
            )
            assert chat[-1]["choices"][0]["finish_reason"] == "abort"
            native = sse_payloads(
                await read_stream(
                    stack.client,
                    "/generate",
                    {"text": "Once", "stream": True, "sampling_params": {"max_new_tokens": 2048}},
                )
            )
            assert native[-1]["meta_info"]["finish_reason"] == {"type": "abort"}
            short = await stack.client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}
            )
            assert short.json()["choices"][0]["finish_reason"] == "length"
            await stack.assert_idle_without_leaks()

    run(main())


def test_max_queued_requests_answers_503_with_retry_after(tmp_path):
    async def main():
        async with gateway_stack(tmp_path, max_running_requests=1, max_queued_requests=1) as stack:
            body = {"model": MODEL, "prompt": "Once", "max_tokens": 2048, "stream": True}
            running = asyncio.create_task(read_stream(stack.client, "/v1/completions", body))
            await stack.wait_for(lambda i: i["running_requests"] == 1)
            queued = asyncio.create_task(read_stream(stack.client, "/v1/completions", body))
            await stack.wait_for(lambda i: i["waiting_requests"] == 1)

            refused = await stack.client.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 8}
            )
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            error = refused.json()["error"]
            assert (
                error["code"] == "resource_exhausted"
                and error["type"] == "service_unavailable_error"
            )
            streamed = await stack.client.post("/generate", json={"text": "x", "stream": True})
            assert streamed.status_code == 503 and "retry-after" in streamed.headers

            await stack.client.post("/abort_request", json={"abort_all": True})
            for task in (running, queued):
                assert sse_payloads(await task)[-1]["choices"][0]["finish_reason"] == "abort"
            await stack.assert_idle_without_leaks()
            ok = await stack.client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}
            )
            assert ok.status_code == 200

    run(main())
