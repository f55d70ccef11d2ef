"""SIGTERM drains: the requests in progress run to their end, new ones get 503 with an OpenAI error
body while the gateway drains (its socket then closes), and every process exits with code 0."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import grpc
import httpx
import pytest

from radixserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests.stack import stop_stack
from tests.gateway.fakes import FakeBackends, RunningGateway
from tests.tiny_stack import MODEL, alive, service_pids, start_tiny_stack


class Stream(threading.Thread):
    """A streamed completion in a thread: its SSE events, in order."""

    def __init__(self, base_url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = base_url + "/v1/completions", {**body, "stream": True}
        self.status, self.events, self.done, self.error = None, [], False, None
        self.started = threading.Event()

    def run(self):
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=120) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.events.append(json.loads(line[len("data: ") :]))
                        self.started.set()
        except httpx.HTTPError as e:  # e.g. a stream cut mid-chunk
            self.error = e

    def text(self) -> str:
        return "".join(e["choices"][0]["text"] for e in self.events if e.get("choices"))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def refused(base_url: str) -> bool:
    try:
        httpx.get(base_url + "/health", timeout=5)
    except httpx.ConnectError:
        return True
    return False


@pytest.mark.e2e
def test_sigterm_to_the_launcher_drains_then_every_process_exits(tmp_path):
    stack = start_tiny_stack(tmp_path)
    try:
        children = service_pids(stack.proc.pid)
        body = {
            "model": MODEL,
            "prompt": "Tell me a story",
            "max_tokens": 1500,
            "ignore_eos": True,
            "temperature": 0,
            "stream_options": {"include_usage": True},
        }
        streams = [Stream(stack.base_url, body) for _ in range(3)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.started.wait(30)

        stack.proc.send_signal(signal.SIGTERM)
        wait_for(
            lambda: httpx.get(stack.base_url + "/health", timeout=30).status_code == 503,
            10,
            "/health 503",
        )
        late = httpx.post(
            stack.base_url + "/v1/completions", json={**body, "max_tokens": 4}, timeout=30
        )
        assert late.status_code == 503, late.text
        assert late.json()["error"] == {
            "message": "the server is shutting down",
            "type": "service_unavailable_error",
            "param": None,
            "code": "service_unavailable",
        }
        assert not any(s.done for s in streams), "the streams ended before the drain was tested"

        assert stack.proc.wait(60) == 0, stack.log_tail()
        for s in streams:
            s.join(5)
            assert (
                s.status == 200 and s.done and s.events[-1]["usage"]["completion_tokens"] == 1500
            ), s.events[-1]
            assert all("error" not in e for e in s.events)
        assert not any(alive(pid) for pid in children.values()), children
        assert refused(stack.base_url)
    finally:
        stop_stack(stack)


def test_gateway_drain_in_process():
    """The gateway alone over fake backends: new HTTP requests get 503 and new gRPC calls UNAVAILABLE
    while an accepted stream runs to its end; then the HTTP socket closes."""
    backends = FakeBackends(step_delay=0.02)
    gw = RunningGateway(backends, shutdown_timeout=30)
    try:
        stream = Stream(gw.base_url, {"model": "fake-model", "prompt": "hi", "max_tokens": 60})
        stream.start()
        assert stream.started.wait(10)
        gw.loop.call_soon_threadsafe(gw.gateway.request_stop)
        wait_for(lambda: gw.gateway.gate.closed, 5, "the gate to close")

        health = httpx.get(gw.base_url + "/health", timeout=10)
        assert health.status_code == 503 and health.headers["connection"] == "close"
        late = httpx.post(
            gw.base_url + "/v1/completions", json={"model": "fake-model", "prompt": "x"}, timeout=10
        )
        assert late.status_code == 503 and late.json()["error"]["code"] == "service_unavailable"

        async def grpc_generate():
            async with grpc.aio.insecure_channel(gw.grpc_addr) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                return [
                    m
                    async for m in stub.Generate(
                        gateway_pb2.GatewayGenerateRequest(text="x"), timeout=5
                    )
                ]

        with pytest.raises(grpc.aio.AioRpcError) as err:
            asyncio.run(grpc_generate())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        assert not stream.done
        stream.join(10)
        assert stream.status == 200 and stream.done and len(stream.text()) == 60
        wait_for(lambda: gw.gateway._http_task.done(), 10, "the HTTP server to stop")
        assert refused(gw.base_url)
    finally:
        gw.close()
        backends.stop()


def test_a_stream_still_running_at_the_shutdown_timeout_ends_with_an_error_event_and_done():
    """At --shutdown-timeout a running stream is cut at an event boundary: an OpenAI-shaped error event,
    then [DONE], then the end of the chunked body; its generation is aborted. A request still waiting
    for its answer gets a 503."""
    backends = FakeBackends(step_delay=0.05)  # 2 tokens per 50 ms: 400 tokens take 10 s
    gw = RunningGateway(backends, shutdown_timeout=0.5)
    try:
        stream = Stream(gw.base_url, {"model": "fake-model", "prompt": "hi", "max_tokens": 200})
        stream.start()
        assert stream.started.wait(10)
        waiting: dict = {}
        waiter = threading.Thread(
            target=lambda: waiting.update(
                response=httpx.post(
                    gw.base_url + "/v1/completions",
                    json={"model": "fake-model", "prompt": "x", "max_tokens": 200},
                    timeout=30,
                )
            ),
            daemon=True,
        )
        waiter.start()
        assert wait_for(
            lambda: len(backends.scheduler.started) == 2, 5, "the second request to start"
        )
        started = time.monotonic()
        gw.loop.call_soon_threadsafe(gw.gateway.request_stop)

        stream.join(10)
        waiter.join(10)
        assert time.monotonic() - started < 5
        assert stream.error is None and stream.status == 200 and stream.done, (
            stream.error,
            stream.events[-1:],
        )
        assert 0 < len(stream.text()) < 200
        assert stream.events[-1] == {
            "error": {
                "message": "the server shut down before this request finished (--shutdown-timeout)",
                "type": "service_unavailable_error",
                "param": None,
                "code": "service_unavailable",
            }
        }
        assert all("error" not in e for e in stream.events[:-1])
        late = waiting["response"]
        assert late.status_code == 503 and late.json()["error"]["code"] == "service_unavailable", (
            late.text
        )
        wait_for(
            lambda: len(backends.scheduler.cancelled) == 2, 5, "both generations to be aborted"
        )
        wait_for(lambda: gw.gateway._http_task.done(), 10, "the HTTP server to stop")
        assert refused(gw.base_url)
    finally:
        gw.close()
        backends.stop()
