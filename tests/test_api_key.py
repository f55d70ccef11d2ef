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
from services.gateway.auth import OPEN_PATHS
from tests.test_gateway_api import MESSAGES, MODEL, RunningGateway, backends  # noqa: F401

KEY = "sk-test-key"
PATH_PARAM = re.compile(r"\{[^}]+\}")


@pytest.fixture(scope="module")
def gw(backends, tmp_path_factory):
    running = RunningGateway(backends, api_key=KEY, file_storage_path=str(tmp_path_factory.mktemp("storage")))
    yield running
    running.close()


def http_routes(routes, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route, descending into included routers; path parameters filled in."""
    found = []
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's wrapper around an included router
            found += http_routes(route.original_router.routes, prefix + route.include_context.prefix)
        elif hasattr(route, "methods") and route.methods:
            found += [(method, PATH_PARAM.sub("dummy", prefix + route.path)) for method in sorted(route.methods)]
    return found


def test_every_route_but_health_needs_the_key(gw):
    routes = http_routes(gw.gateway.app.routes)
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/batches"), ("GET", "/v1/files/dummy/content"),
            ("GET", "/health")} <= set(routes)
    for method, path in routes:
        url = gw.base_url + path
        if path in OPEN_PATHS:
            assert httpx.request(method, url, timeout=30).status_code != 401, path
            continue
        missing = httpx.request(method, url)
        wrong = httpx.request(method, url, headers={"Authorization": "Bearer sk-wrong"})
        assert missing.status_code == wrong.status_code == 401, (method, path)
        assert missing.headers["www-authenticate"] == wrong.headers["www-authenticate"] == "Bearer"
        if method != "HEAD":
            assert missing.json()["error"]["type"] == "invalid_request_error"
            assert (missing.json()["error"]["code"], wrong.json()["error"]["code"]) == (None, "invalid_api_key")
        right = httpx.request(method, url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert right.status_code != 401, (method, path, right.text)


def test_requests_with_the_key_are_served(gw):
    headers = {"Authorization": f"bearer {KEY}"}  # the scheme is case-insensitive
    r = httpx.post(gw.base_url + "/v1/chat/completions", headers=headers, timeout=30,
                   json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert httpx.get(gw.base_url + "/get_server_info", headers=headers, timeout=30).json()["api_key"] is None


def test_batch_lines_run_in_process_carry_the_key(gw):
    headers = {"Authorization": f"Bearer {KEY}"}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "x", "max_tokens": 3}}
    uploaded = httpx.post(gw.base_url + "/v1/files", headers=headers, data={"purpose": "batch"},
                          files={"file": ("in.jsonl", json.dumps(line).encode())}).json()
    batch = httpx.post(gw.base_url + "/v1/batches", headers=headers, json={
        "input_file_id": uploaded["id"], "endpoint": "/v1/completions", "completion_window": "24h"}).json()
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
                    [m async for m in stub.Generate(gateway_pb2.GatewayGenerateRequest(text="x"), metadata=metadata)]
                codes.append(denied.value.code())
            key = (("authorization", f"Bearer {KEY}"),)
            models = await stub.ListModels(gateway_pb2.GatewayListModelsRequest(), metadata=key)
            pieces = [m async for m in stub.Generate(gateway_pb2.GatewayGenerateRequest(text="x"), metadata=key)]
            health = await stub.Health(gateway_pb2.GatewayHealthRequest())
            return codes, models, pieces, health

    codes, models, pieces, health = asyncio.run(calls())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert [m.id for m in models.models] == [MODEL]
    assert "".join(p.text for p in pieces) and pieces[-1].finish_reason
    assert health.healthy
