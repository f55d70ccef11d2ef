"""The real gRPC scheduler in-process against a fake executor servicer (tests/fake_executor.py), on ephemeral
ports, and helpers to call it."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from radixserve.v1 import common_pb2, executor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from radixserve.common.args import ServerArgs
from radixserve.common.grpc_util import aio_channel, aio_server, bind
from radixserve.scheduler.server import start_scheduler
from tests.fake_executor import FakeExecutorServicer
from tests.scheduler.harness import VOCAB

KV_SLOTS = 257


class SlowFakeExecutor(FakeExecutorServicer):
    step_delay = 0.0
    concurrent_steps = 0
    max_concurrent_steps = 0

    async def Step(self, request, context):
        self.concurrent_steps += 1
        self.max_concurrent_steps = max(self.max_concurrent_steps, self.concurrent_steps)
        try:
            if self.step_delay:
                await asyncio.sleep(self.step_delay)
            return await super().Step(request, context)
        finally:
            self.concurrent_steps -= 1


class MethodRecorder(grpc.aio.ServerInterceptor):
    """The name of each RPC the server is called with (a stream counts once)."""

    def __init__(self):
        self.methods: list[str] = []

    async def intercept_service(self, continuation, handler_call_details):
        self.methods.append(handler_call_details.method.rsplit("/", 1)[-1])
        return await continuation(handler_call_details)


@contextlib.asynccontextmanager
async def stack(eos_token_ids=(), **arg_overrides):
    """executor.rpc_methods: the RPCs the scheduler called the fake executor with."""
    executor = SlowFakeExecutor(
        kv_slots=KV_SLOTS, vocab_size=VOCAB, context_length=128, eos_token_ids=eos_token_ids
    )
    recorder = MethodRecorder()
    executor.rpc_methods = recorder.methods
    exec_server = aio_server([recorder])
    executor_pb2_grpc.add_ExecutorServicer_to_server(executor, exec_server)
    exec_port = bind(exec_server, "127.0.0.1:0")
    await exec_server.start()
    args = ServerArgs(
        scheduler_addr="127.0.0.1:0", executor_addr=f"127.0.0.1:{exec_port}", **arg_overrides
    )
    scheduler = await start_scheduler(args)
    channel = aio_channel(f"127.0.0.1:{scheduler.port}")
    try:
        yield scheduler_pb2_grpc.SchedulerStub(channel), executor, scheduler
    finally:
        await channel.close()
        await scheduler.stop()
        await exec_server.stop(None)


def run(coro):
    asyncio.run(asyncio.wait_for(coro, timeout=30))


def gen_request(rid, prompt, max_new=5, ignore_eos=True, **sampling):
    return scheduler_pb2.SchedulerGenerateRequest(
        request_id=rid,
        input_ids=prompt,
        sampling=common_pb2.SamplingParams(**sampling),
        stopping=common_pb2.StoppingCriteria(max_new_tokens=max_new, ignore_eos=ignore_eos),
    )


async def collect(stub, request):
    return [msg async for msg in stub.Generate(request)]


async def wait_idle(stub):
    for _ in range(200):
        info = await stub.GetInfo(scheduler_pb2.SchedulerInfoRequest())
        if info.running_requests == 0 and info.waiting_requests == 0 and info.in_use_tokens == 0:
            return info
        await asyncio.sleep(0.01)
    raise AssertionError(f"scheduler never went idle: {info}")
