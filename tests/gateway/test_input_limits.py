"""Input limits at the gateway (fake backends, real HTTP server): --max-payload-size (413, also for
chunked bodies and multipart uploads), errors in OpenAI's shape for every status, prompts beyond the
context (400, or cut to their last tokens with --allow-auto-truncate), duplicate request ids."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from tests.gateway.fakes import CONTEXT_LENGTH, FakeBackends, encode, gateway_client

MODEL = "fake-model"
LIMIT = 2000
MESSAGES = [{"role": "user", "content": "Hi"}]


@contextlib.asynccontextmanager
async def gateway(backends: FakeBackends, tmp_path, **flags):
    async with gateway_client(
        backends.tokenizer_addr,
        backends.scheduler_addr,
        backends.detokenizer_addr,
        served_model_name=MODEL,
        file_storage_path=str(tmp_path),
        **flags,
    ) as (client, _):
        yield client


def run_with_gateway(tmp_path, body, **flags) -> FakeBackends:
    backends = FakeBackends()

    async def main():
        async with gateway(backends, tmp_path, **flags) as client:
            await body(client, backends)

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        backends.stop()
    return backends


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert (
        "Traceback" not in response.text
        and "object at 0x" not in response.text
        and "<class" not in response.text
    )
    if code is not None:
        assert error["code"] == code, error
    return error


async def chunks(data: bytes, size: int = 500):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def multipart(filename: str, content: bytes, purpose: str = "batch") -> tuple[bytes, str]:
    boundary = "radixserve-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_bodies_over_max_payload_size_get_413_declared_chunked_or_multipart(tmp_path):
    async def body(client: httpx.AsyncClient, _):
        small = await client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3}
        )
        assert small.status_code == 200
        big = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x" * LIMIT}],
            "max_tokens": 3,
        }
        r = await client.post("/v1/chat/completions", json=big)
        assert_openai_error(r, 413, "payload_too_large")

        raw = httpx.Request("POST", "/", json=big).content
        r = await client.post(
            "/generate", content=chunks(raw), headers={"content-type": "application/json"}
        )
        assert "content-length" not in r.request.headers
        assert_openai_error(r, 413, "payload_too_large")

        upload, content_type = multipart("big.jsonl", b"y" * LIMIT)
        r = await client.post("/v1/files", content=upload, headers={"content-type": content_type})
        assert_openai_error(r, 413, "payload_too_large")
        r = await client.post(
            "/v1/files", content=chunks(upload), headers={"content-type": content_type}
        )
        assert_openai_error(r, 413, "payload_too_large")

        upload, content_type = multipart("small.jsonl", b"{}\n")
        r = await client.post(
            "/v1/files", content=chunks(upload, 50), headers={"content-type": content_type}
        )
        assert r.status_code == 200 and r.json()["bytes"] == 3
        small = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}
        )
        assert small.status_code == 200  # still serving after the refusals

    run_with_gateway(tmp_path, body, max_payload_size=LIMIT)


def test_every_error_status_answers_in_openais_shape(tmp_path):
    async def body(client: httpx.AsyncClient, _):
        assert_openai_error(await client.get("/v1/no-such-route"), 404)
        assert_openai_error(await client.get("/v1/models/other-model"), 404, "model_not_found")
        assert_openai_error(
            await client.post(
                "/v1/chat/completions", json={"model": "other", "messages": MESSAGES}
            ),
            404,
            "model_not_found",
        )
        assert_openai_error(await client.delete("/v1/models"), 405)
        assert_openai_error(
            await client.post("/v1/completions", content=b"{not json"), 400, "invalid_json"
        )
        assert_openai_error(
            await client.post("/v1/completions", content=b"\xff\xfe{}"), 400, "invalid_json"
        )
        assert_openai_error(
            await client.post("/v1/completions", content=b"[" * 50_000 + b"]" * 50_000),
            400,
            "invalid_json",
        )
        assert_openai_error(
            await client.post("/v1/completions", content=b'{"prompt": "\\ud800", "max_tokens": 2}'),
            400,
            "invalid_json",
        )
        error = assert_openai_error(
            await client.get("/v1/files", params={"limit": "many"}), 400, "invalid_value"
        )
        assert error["param"] == "query.limit"
        error = assert_openai_error(
            await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2**40}),
            400,
            "invalid_value",
        )
        assert error["param"] == "max_tokens"
        for field, value in (("top_k", 2**40), ("stop_token_ids", [2**40]), ("min_tokens", 2**40)):
            error = assert_openai_error(
                await client.post("/v1/completions", json={"prompt": "x", field: value}), 400
            )
            assert error["param"] == field
        assert_openai_error(
            await client.post("/v1/completions", json={"prompt": [2**40], "max_tokens": 2}), 400
        )
        not_a_file = await client.post("/v1/files", data={"purpose": "batch", "file": "not a file"})
        error = assert_openai_error(not_a_file, 400)
        assert (
            error["param"] == "file"
            and error["message"] == "file: Expected UploadFile, received: str"
        )

    run_with_gateway(tmp_path, body)


def test_chat_message_content_null_or_missing_is_a_400_as_openai_answers(tmp_path):
    """OpenAI requires content (a string or a list of parts) in every message, but an assistant message
    with tool_calls (or the older function_call) may leave it null or out."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

    async def body(client: httpx.AsyncClient, backends):
        started = len(backends.scheduler.started)
        for i, message in enumerate(
            [
                {"role": "user"},
                {"role": "user", "content": None},
                {"role": "system", "content": None},
                {"role": "developer"},
                {"role": "tool", "tool_call_id": "call_1", "content": None},
                {"role": "assistant", "content": None},
                {"role": "assistant"},
            ]
        ):
            for stream in (False, True):
                messages = [*MESSAGES, message] if i else [message]
                r = await client.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": messages, "max_tokens": 2, "stream": stream},
                )
                error = assert_openai_error(r, 400, "invalid_value")
                assert error["param"] == f"messages.{len(messages) - 1}.content", error
                assert (
                    error["type"] == "invalid_request_error" and message["role"] in error["message"]
                )
        assert len(backends.scheduler.started) == started

        for messages in (
            [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            [{"role": "user", "content": ""}],
            [
                *MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            ],
            [
                *MESSAGES,
                {"role": "assistant", "tool_calls": [call]},
                {
                    "role": "tool",
                    "tool_call_id": "call_1",
                    "content": [{"type": "text", "text": "42"}],
                },
            ],
            [
                *MESSAGES,
                {
                    "role": "assistant",
                    "content": None,
                    "function_call": {"name": "f", "arguments": "{}"},
                },
            ],
        ):
            r = await client.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2}
            )
            assert r.status_code == 200, (messages, r.text)

    run_with_gateway(tmp_path, body)


def test_prompt_beyond_the_context_length_is_a_400(tmp_path):
    async def body(client: httpx.AsyncClient, backends):
        started = len(backends.scheduler.started)
        r = await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "x" * (CONTEXT_LENGTH + 10), "max_tokens": 5},
        )
        assert_openai_error(r, 400, "context_length_exceeded")
        r = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "x" * 250, "max_tokens": 10}
        )
        assert_openai_error(r, 400, "context_length_exceeded")
        assert len(backends.scheduler.started) == started

    run_with_gateway(tmp_path, body)


def test_allow_auto_truncate_keeps_the_last_tokens_that_leave_room_for_the_completion(
    tmp_path, caplog
):
    prompt = "".join(chr(ord("a") + i % 26) for i in range(CONTEXT_LENGTH + 40))

    async def body(client: httpx.AsyncClient, backends):
        r = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 10}
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == CONTEXT_LENGTH - 10
        assert r.json()["usage"]["completion_tokens"] == 10
        assert backends.scheduler.prompts[-1] == encode(prompt)[-(CONTEXT_LENGTH - 10) :]
        # /generate's default max_new_tokens (128) is the room it leaves
        r = await client.post("/generate", json={"text": prompt})
        assert (
            r.status_code == 200 and r.json()["meta_info"]["prompt_tokens"] == CONTEXT_LENGTH - 128
        )
        # a completion that cannot fit at all is still refused
        r = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": CONTEXT_LENGTH}
        )
        assert_openai_error(r, 400, "context_length_exceeded")

    with caplog.at_level(logging.WARNING, logger="radixserve.gateway.engine"):
        run_with_gateway(tmp_path, body, allow_auto_truncate=True)
    assert any("truncated to its last 246" in record.getMessage() for record in caplog.records)


def test_a_request_id_in_use_is_a_400(tmp_path):
    async def body(client: httpx.AsyncClient, backends):
        backends.scheduler.step_delay = 0.02
        first = asyncio.create_task(
            client.post(
                "/generate",
                json={"text": "a", "rid": "same", "sampling_params": {"max_new_tokens": 100}},
            )
        )
        while "same" not in backends.scheduler.active:
            await asyncio.sleep(0.01)
        second = await client.post("/generate", json={"text": "b", "rid": "same"})
        assert_openai_error(second, 400, "duplicate_request_id")
        assert (await first).json()["meta_info"]["finish_reason"]["type"] == "length"

    run_with_gateway(tmp_path, body)
