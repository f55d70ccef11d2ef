"""kill -9 of the executor under load, on the five-process stack: the running requests fail within
seconds with an error naming the executor, /health answers 503 at once, the launcher restarts the
executor, the queued requests complete, /health comes back, and no other process was restarted."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.stack import scheduler_info, stop_stack
from tests.tiny_stack import MODEL, service_pids, start_tiny_stack

pytestmark = pytest.mark.e2e

LONG_TOKENS = 16000  # still running when the executor is killed
SHORT_TOKENS = 16


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_tiny_stack(tmp_path_factory.mktemp("crash"), "--max-running-requests", "2")
    yield s
    stop_stack(s)
    assert s.proc.returncode == 0, s.log_tail()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def completion(max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


class Call(threading.Thread):
    """One HTTP request in a thread: the response (status, JSON or SSE events) and when it ended."""

    def __init__(self, stack, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = stack.base_url + "/v1/completions", body
        self.status, self.result, self.events, self.ended = None, None, [], None
        self.first_event = threading.Event()

    def run(self):
        with httpx.Client(timeout=120) as client:
            if not self.body["stream"]:
                resp = client.post(self.url, json=self.body)
                self.status = resp.status_code
                self.result = (
                    resp.json()
                    if resp.headers.get("content-type") == "application/json"
                    else resp.text
                )
            else:
                with client.stream("POST", self.url, json=self.body) as resp:
                    self.status = resp.status_code
                    for line in resp.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            self.events.append(json.loads(line[len("data: ") :]))
                            self.first_event.set()
        self.ended = time.monotonic()


def health(stack) -> tuple[int, float, str]:
    started = time.monotonic()
    resp = httpx.get(stack.base_url + "/health", timeout=60)
    return resp.status_code, time.monotonic() - started, resp.text


def test_executor_killed_under_load(stack):
    assert health(stack)[0] == 200
    before = service_pids(stack.proc.pid)
    streamed, unary = (
        Call(stack, completion(LONG_TOKENS, stream=True)),
        Call(stack, completion(LONG_TOKENS)),
    )
    for call in (streamed, unary):
        call.start()
    assert streamed.first_event.wait(30)
    wait_for(lambda: scheduler_info(stack).running_requests == 2, 30, "two running requests")
    queued = [Call(stack, completion(SHORT_TOKENS)) for _ in range(3)]
    for call in queued:
        call.start()
    wait_for(lambda: scheduler_info(stack).waiting_requests == 3, 30, "three queued requests")

    killed_at = time.monotonic()
    os.kill(before["executor"], signal.SIGKILL)

    for call in (streamed, unary):
        call.join(10)
        assert call.ended is not None and call.ended - killed_at < 5, (
            "a running request did not fail in time"
        )
    assert unary.status == 503 and "executor" in unary.result["error"]["message"], unary.result
    error = streamed.events[-1]["error"]
    assert error["type"] == "service_unavailable_error" and "executor" in error["message"], (
        streamed.events[-1]
    )

    status, took, body = health(stack)
    assert status == 503 and took < 2 and "executor" in body, (status, took, body)
    assert scheduler_info(stack).executor_unavailable
    # A queued request is lost if it failed; with a fast restart it may already have completed (200).
    assert all(call.ended is None or call.status == 200 for call in queued), (
        "a queued request was lost"
    )

    for call in queued:
        call.join(60)
        assert call.status == 200, (call.status, call.result, stack.log_tail())
        assert call.result["usage"]["completion_tokens"] == SHORT_TOKENS
    wait_for(lambda: health(stack)[0] == 200, 30, "/health to answer 200 again")

    after = service_pids(stack.proc.pid)
    assert after["executor"] != before["executor"]
    assert {k: v for k, v in after.items() if k != "executor"} == {
        k: v for k, v in before.items() if k != "executor"
    }
    info = scheduler_info(stack)
    assert not info.executor_unavailable and info.running_requests == info.waiting_requests == 0
    assert "executor (pid %d) exited with signal SIGKILL" % before["executor"] in stack.log_tail(
        400
    )
