"""--api-key: every HTTP route but the health checks, and the gRPC API, need `Authorization: Bearer KEY`."""

from __future__ import annotations

import asyncio
import json
import re
import time

import grpc
import httpx
import pytest

from radixserve.v1 import gateway_pb2, gateway_pb2_grpc
from radixserve.gateway.api.anthropic_protocol import is_anthropic_path
from radixserve.gateway.api.auth import OPEN_PATHS
from tests.gateway.fakes import MESSAGES, MODEL, RunningGateway

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PATH_PARAM = re.compile(r"\{(\w+)(:\w+)?\}")
SLOW_STEP_S = (
    0.05  # the fake scheduler's step while the minimal requests run: a batch stays cancellable
)


@pytest.fixture(scope="module")
def gw(backends, tmp_path_factory):
    # (grpc_auth_token is only read here, not installed: the fakes take no token)
    running = RunningGateway(
        backends,
        api_key=KEY,
        grpc_auth_token="inter-service-secret",
        file_storage_path=str(tmp_path_factory.mktemp("storage")),
    )
    yield running
    running.close()


def http_routes(routes, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path template) of every route, descending into included routers."""
    found = []
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's wrapper around an included router
            found += http_routes(
                route.original_router.routes, prefix + route.include_context.prefix
            )
        elif hasattr(route, "methods") and route.methods:
            found += [(method, prefix + route.path) for method in sorted(route.methods)]
    return found


def fill(template: str, params: dict[str, str] | None = None) -> str:
    return PATH_PARAM.sub(lambda m: (params or {}).get(m.group(1), "dummy"), template)


def test_every_route_but_health_needs_the_key(gw):
    routes = http_routes(gw.gateway.app.routes)
    assert {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/files/{file_id}/content"),
        ("GET", "/health"),
    } <= set(routes)
    for method, template in routes:
        path = fill(template)
        url = gw.base_url + path
        if path in OPEN_PATHS:
            assert httpx.request(method, url, timeout=30).status_code != 401, path
            continue
        missing = httpx.request(method, url)
        wrong = httpx.request(method, url, headers={"Authorization": "Bearer sk-wrong"})
        prefix = httpx.request(method, url, headers={"Authorization": f"Bearer {KEY[:-1]}"})
        assert missing.status_code == wrong.status_code == prefix.status_code == 401, (method, path)
        if is_anthropic_path(path):  # Anthropic's answer: its error shape, no WWW-Authenticate
            assert_anthropic_refusals(missing, wrong)
            continue
        assert missing.headers["www-authenticate"] == wrong.headers["www-authenticate"] == "Bearer"
        if method != "HEAD":
            assert missing.json()["error"]["type"] == "invalid_request_error"
            assert (missing.json()["error"]["code"], wrong.json()["error"]["code"]) == (
                None,
                "invalid_api_key",
            )


def assert_anthropic_refusals(missing: httpx.Response, wrong: httpx.Response) -> None:
    assert (missing.json(), wrong.json()) == (
        {
            "type": "error",
            "error": {"type": "authentication_error", "message": "missing x-api-key"},
        },
        {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        },
    )


def test_anthropic_routes_take_the_key_as_x_api_key_too(gw):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    url = gw.base_url + "/v1/messages"
    for headers in (AUTH, {"x-api-key": KEY}):
        r = httpx.post(url, headers=headers, json=body, timeout=30)
        assert r.status_code == 200 and r.json()["type"] == "message", r.text
    missing = httpx.post(url, json=body, timeout=30)
    wrong = httpx.post(url, headers={"x-api-key": KEY[:-1]}, json=body, timeout=30)
    assert missing.status_code == wrong.status_code == 401
    assert_anthropic_refusals(missing, wrong)
    # Elsewhere x-api-key is no key: the OpenAI routes take Bearer only.
    chat = httpx.post(
        gw.base_url + "/v1/chat/completions", headers={"x-api-key": KEY}, json=body, timeout=30
    )
    assert chat.status_code == 401 and chat.json()["error"]["code"] is None


def upload(gw, content: bytes, purpose: str) -> str:
    r = httpx.post(
        gw.base_url + "/v1/files",
        headers=AUTH,
        data={"purpose": purpose},
        files={"file": ("in.jsonl", content)},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.fixture
def slow_backends(gw):
    gw.backends.scheduler.step_delay = SLOW_STEP_S
    yield
    gw.backends.scheduler.step_delay = 0.002


def minimal_requests(gw) -> dict[tuple[str, str], tuple[dict, int]]:
    """A valid minimal request for each route, as httpx.request keyword arguments (plus "path": its
    parameters), and the status it gets with the key."""
    slow_line = {
        "custom_id": "slow",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MODEL, "prompt": "x", "max_tokens": 200},
    }
    batch_file = upload(gw, json.dumps(slow_line).encode(), "batch")
    batch = {"input_file_id": batch_file, "endpoint": "/v1/completions", "completion_window": "24h"}
    batch_id = httpx.post(gw.base_url + "/v1/batches", headers=AUTH, json=batch, timeout=30).json()[
        "id"
    ]
    file_param, batch_param = {"file_id": batch_file}, {"batch_id": batch_id}
    ok = 200
    return {
        **{
            (method, path): ({}, ok)
            for method in ("GET", "HEAD")
            for path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
        },
        ("GET", "/v1/models"): ({}, ok),
        ("GET", "/v1/models/{model_id:path}"): ({"path": {"model_id": MODEL}}, ok),
        ("POST", "/v1/chat/completions"): (
            {"json": {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}},
            ok,
        ),
        ("POST", "/v1/completions"): (
            {"json": {"model": MODEL, "prompt": "x", "max_tokens": 2}},
            ok,
        ),
        ("POST", "/generate"): (
            {"json": {"text": "x", "sampling_params": {"max_new_tokens": 2}}},
            ok,
        ),
        ("GET", "/health"): ({}, ok),
        ("GET", "/health_generate"): ({}, ok),
        ("GET", "/get_model_info"): ({}, ok),
        ("GET", "/get_server_info"): ({}, ok),
        ("GET", "/flush_cache"): ({}, ok),
        ("POST", "/flush_cache"): ({}, ok),
        # A generation server refuses embeddings: the key let the request through to say so.
        ("POST", "/v1/embeddings"): ({"json": {"model": MODEL, "input": "x"}}, 400),
        ("POST", "/v1/classify"): ({"json": {"model": MODEL, "input": "x"}}, 400),
        ("POST", "/classify"): ({"json": {"model": MODEL, "input": "x"}}, 400),
        ("POST", "/v1/files"): (
            {"data": {"purpose": "user_data"}, "files": {"file": ("a.txt", b"a")}},
            ok,
        ),
        ("GET", "/v1/files"): ({}, ok),
        ("GET", "/v1/files/{file_id}"): ({"path": file_param}, ok),
        ("GET", "/v1/files/{file_id}/content"): ({"path": file_param}, ok),
        ("POST", "/v1/batches"): ({"json": batch}, ok),
        ("GET", "/v1/batches"): ({}, ok),
        ("GET", "/v1/batches/{batch_id}"): ({"path": batch_param}, ok),
        ("POST", "/v1/batches/{batch_id}/cancel"): ({"path": batch_param}, ok),
        ("DELETE", "/v1/files/{file_id}"): (
            {"path": {"file_id": upload(gw, b"bye", "user_data")}},
            ok,
        ),
        # After the batch's cancel, so as not to give its slow line more time to complete first.
        ("POST", "/v1/messages"): (
            {"json": {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}},
            ok,
        ),
        ("POST", "/v1/messages/count_tokens"): (
            {"json": {"model": MODEL, "messages": MESSAGES}},
            ok,
        ),
        ("GET", "/metrics"): ({}, 404),  # off without --enable-metrics
        ("POST", "/abort_request"): (
            {"json": {"abort_all": True}},
            ok,
        ),  # last: it ends the batches' lines
    }


def test_every_route_serves_a_minimal_request_with_the_key(gw, slow_backends):
    routes = http_routes(gw.gateway.app.routes)
    requests = minimal_requests(gw)
    assert set(requests) <= set(routes), set(requests) - set(routes)
    for (method, template), (kwargs, expected) in requests.items():
        path = fill(template, kwargs.pop("path", None))
        r = httpx.request(method, gw.base_url + path, headers=AUTH, timeout=30, **kwargs)
        assert r.status_code == expected, (method, path, r.text)
    for method, template in set(routes) - set(requests):  # routes this table does not know yet
        r = httpx.request(method, gw.base_url + fill(template), headers=AUTH, timeout=30)
        assert r.status_code != 401, (method, template, r.text)


def test_requests_with_the_key_are_served(gw):
    headers = {"Authorization": f"bearer {KEY}"}  # the scheme is case-insensitive
    r = httpx.post(
        gw.base_url + "/v1/chat/completions",
        headers=headers,
        timeout=30,
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4},
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    info = httpx.get(gw.base_url + "/get_server_info", headers=headers, timeout=30).json()
    assert info["api_key"] is None and info["grpc_auth_token"] is None  # secrets are not echoed


def test_batch_lines_run_in_process_carry_the_key(gw):
    headers = {"Authorization": f"Bearer {KEY}"}
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MODEL, "prompt": "x", "max_tokens": 3},
    }
    uploaded = httpx.post(
        gw.base_url + "/v1/files",
        headers=headers,
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", json.dumps(line).encode())},
    ).json()
    batch = httpx.post(
        gw.base_url + "/v1/batches",
        headers=headers,
        json={
            "input_file_id": uploaded["id"],
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
    ).json()
    deadline = time.time() + 10
    while batch["status"] != "completed":
        assert time.time() < deadline, batch
        time.sleep(0.05)
        batch = httpx.get(f"{gw.base_url}/v1/batches/{batch['id']}", headers=headers).json()
    assert batch["request_counts"] == {"total": 1, "completed": 1, "failed": 0}


def test_grpc_api_needs_the_key_but_health(gw):
    async def calls():
        async with grpc.aio.insecure_channel(gw.grpc_addr) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            codes = []
            for metadata in (None, (("authorization", "Bearer sk-wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await stub.ListModels(gateway_pb2.GatewayListModelsRequest(), metadata=metadata)
                codes.append(denied.value.code())
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    [
                        m
                        async for m in stub.Generate(
                            gateway_pb2.GatewayGenerateRequest(text="x"), metadata=metadata
                        )
                    ]
                codes.append(denied.value.code())
            key = (("authorization", f"Bearer {KEY}"),)
            models = await stub.ListModels(gateway_pb2.GatewayListModelsRequest(), metadata=key)
            pieces = [
                m
                async for m in stub.Generate(
                    gateway_pb2.GatewayGenerateRequest(text="x"), metadata=key
                )
            ]
            health = await stub.Health(gateway_pb2.GatewayHealthRequest())
            return codes, models, pieces, health

    codes, models, pieces, health = asyncio.run(calls())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert [m.id for m in models.models] == [MODEL]
    assert "".join(p.text for p in pieces) and pieces[-1].finish_reason
    assert health.healthy
