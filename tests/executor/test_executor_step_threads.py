"""Which threads run a step in the executor servicer: on a device that launches ahead (CUDA) the worker
launches and the collector reads back; on the CPU, where launching runs the step, the worker does both
(one thread hop per step instead of two)."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest
import torch

from radixserve.v1 import executor_pb2, executor_pb2_grpc
from radixserve.common.grpc_util import aio_channel
from radixserve.common.step import StepOutput
from radixserve.common.step_session import ExecutorSession
from radixserve.executor.runner import ModelRunner
from radixserve.executor.server import start_server, torch_worker


class ThreadRecordingRunner:
    """Just enough of a ModelRunner for Step: records the thread each half of a step runs on."""

    def __init__(self, launches_ahead: bool):
        self.launches_ahead = launches_ahead
        self.threads: dict[str, str] = {}

    def launch(self, step):
        self.threads["launch"] = threading.current_thread().name
        return step.step_id

    def collect(self, step_id):
        self.threads["collect"] = threading.current_thread().name
        return StepOutput(step_id=step_id, outputs=[], forward_ms=0.0)

    def reset(self):
        return 0


async def run_one_step(runner) -> executor_pb2.ExecutorStepResponse:
    server, port = await start_server(runner, "127.0.0.1:0", torch_worker())
    channel = aio_channel(f"127.0.0.1:{port}")
    try:
        stub = executor_pb2_grpc.ExecutorStub(channel)
        session = await ExecutorSession.open(stub)
        resp = await stub.Step(executor_pb2.ExecutorStepRequest(step_id=1, session_id=session.id))
        session.close()
        return resp
    finally:
        await channel.close()
        await server.stop(None)


@pytest.mark.parametrize(
    "launches_ahead, collect_thread", [(True, "executor-collect"), (False, "executor-torch")]
)
def test_a_step_is_collected_on_the_worker_unless_it_launches_ahead(launches_ahead, collect_thread):
    runner = ThreadRecordingRunner(launches_ahead)
    resp = asyncio.run(asyncio.wait_for(run_one_step(runner), 30))
    assert resp.step_id == 1
    assert runner.threads["launch"].startswith("executor-torch")
    assert runner.threads["collect"].startswith(collect_thread)


@pytest.mark.parametrize("device, ahead", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_only_device_runners_launch_ahead(device, ahead):
    runner = types.SimpleNamespace(device=torch.device(device))
    assert ModelRunner.launches_ahead.fget(runner) is ahead
