"""The executor's step watchdog: a job past --watchdog-timeout is reported with every thread's stack,
then the process exits non-zero (so the launcher restarts it)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

from radixserve.v1 import executor_pb2, executor_pb2_grpc
from radixserve.common.grpc_util import aio_channel
from radixserve.common.step_session import ExecutorSession
from radixserve.executor.server import start_server, torch_worker
from radixserve.common.step import StepOutput
from radixserve.executor.watchdog import WATCHDOG_EXIT_CODE, StepWatchdog


class Hangs:
    def __init__(self):
        self.messages: list[str] = []
        self.called = threading.Event()

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.called.set()


def slow_step(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def test_a_step_past_the_timeout_is_reported_once_with_the_stacks(capfd):
    hangs = Hangs()
    watchdog = StepWatchdog(0.1, on_hang=hangs).start()
    try:
        assert watchdog.run(slow_step, 0.5) == "done"
    finally:
        watchdog.stop()
    assert len(hangs.messages) == 1
    assert "slow_step" in hangs.messages[0] and "--watchdog-timeout 0.1s" in hangs.messages[0]
    stacks = capfd.readouterr().err
    assert "most recent call first" in stacks and "slow_step" in stacks


def test_steps_within_the_timeout_are_not_reported():
    hangs = Hangs()
    watchdog = StepWatchdog(0.3, on_hang=hangs).start()
    try:
        for _ in range(5):
            watchdog.run(slow_step, 0.1)  # 0.5s of steps in all, each one short
    finally:
        watchdog.stop()
    assert hangs.messages == []


class SleepyRunner:
    """Just enough of a ModelRunner for the servicer's Step: collecting a step (waiting for the device)
    sleeps."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def launch(self, step):
        return step.step_id

    def collect(self, step_id):
        time.sleep(self.seconds)
        return StepOutput(step_id=step_id, outputs=[], forward_ms=self.seconds * 1000)

    def reset(self):  # opening the step session drops the request state
        return 0


def test_the_executor_servicer_runs_steps_under_the_watchdog():
    async def body():
        hangs = Hangs()
        watchdog = StepWatchdog(0.1, on_hang=hangs).start()
        server, port = await start_server(
            SleepyRunner(0.4), "127.0.0.1:0", torch_worker(), watchdog
        )
        channel = aio_channel(f"127.0.0.1:{port}")
        try:
            stub = executor_pb2_grpc.ExecutorStub(channel)
            session = await ExecutorSession.open(stub)
            resp = await stub.Step(
                executor_pb2.ExecutorStepRequest(step_id=1, session_id=session.id)
            )
            session.close()
        finally:
            await channel.close()
            await server.stop(None)
            watchdog.stop()
        return resp, hangs

    resp, hangs = asyncio.run(asyncio.wait_for(body(), 30))
    assert resp.step_id == 1 and len(hangs.messages) == 1 and "_collect" in hangs.messages[0]


def test_by_default_a_hung_step_exits_the_process_non_zero():
    script = (
        "import time\n"
        "from radixserve.executor.watchdog import StepWatchdog\n"
        "StepWatchdog(0.2).start().run(time.sleep, 30)\n"
    )
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == WATCHDOG_EXIT_CODE, out.stderr
    assert time.monotonic() - started < 15
    assert "over --watchdog-timeout 0.2s" in out.stderr and "most recent call first" in out.stderr
