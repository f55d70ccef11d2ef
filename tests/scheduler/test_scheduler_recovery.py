"""The scheduler when its executor fails: admitted requests fail, queued ones wait for the executor
to come back and then run; a hung step hits its deadline; an executor that comes back with another
model stops the step loop (the process exits and is restarted)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from radixserve.v1 import common_pb2, executor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from radixserve.common.args import ServerArgs
from radixserve.common.grpc_util import aio_channel, aio_server, bind
from radixserve.scheduler.core import Scheduler
from tests.configs import scheduler_config
from tests.fake_executor import FakeExecutorServicer, FakeModel, reference_tokens
from radixserve.common.sampling import StoppingCriteria
from radixserve.common.step import SampledToken
from radixserve.scheduler.request import Request
from radixserve.scheduler.runtime import ExecutorChanged, step_deadline
from radixserve.scheduler.server import start_scheduler

VOCAB = 1000
KV_SLOTS = 1025


def test_core_reset_keeping_waiting_fails_only_admitted_requests():
    sched = Scheduler(scheduler_config(max_running_requests=2), 64, 256)
    model = FakeModel(64, VOCAB)
    for i, rid in enumerate("abcd"):
        sched.add_request(Request(rid, [i + 1, 2, 3], StoppingCriteria(5)))
    plan = sched.schedule()
    sched.update(plan, [SampledToken(r, t) for r, t in model.step(plan)])
    sched.schedule()  # a step in flight when the executor fails

    assert sorted(sched.reset(keep_waiting=True)) == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c", "d"] and sorted(sched.requests) == [
        "c",
        "d",
    ]
    assert (
        not sched.running and sched.pool.available() == 63 and sched.check_leak(deep=True) is None
    )

    sched.executor_was_reset()
    model, outputs = FakeModel(64, VOCAB), {"c": [], "d": []}
    while (plan := sched.schedule()) is not None:
        for event in sched.update(plan, [SampledToken(r, t) for r, t in model.step(plan)]):
            outputs[event.request_id] += event.token_ids
    assert outputs == {
        "c": reference_tokens([3, 2, 3], 5, VOCAB),
        "d": reference_tokens([4, 2, 3], 5, VOCAB),
    }
    assert sched.check_leak(deep=True) is None


class GatedExecutor(FakeExecutorServicer):
    """Steps take step_delay; while `hang` is set a step blocks until it is cleared."""

    step_delay = 0.01

    def __init__(self, **kwargs):
        super().__init__(kv_slots=KV_SLOTS, vocab_size=VOCAB, **kwargs)
        self.released = asyncio.Event()
        self.released.set()

    async def Step(self, request, context):
        await asyncio.sleep(self.step_delay)
        await self.released.wait()
        return await super().Step(request, context)


async def serve_executor(executor, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = aio_server()
    executor_pb2_grpc.add_ExecutorServicer_to_server(executor, server)
    port = bind(server, f"127.0.0.1:{port}")
    await server.start()
    return server, port


@contextlib.asynccontextmanager
async def scheduler_over(exec_port: int, **arg_overrides):
    args = ServerArgs(
        scheduler_addr="127.0.0.1:0", executor_addr=f"127.0.0.1:{exec_port}", **arg_overrides
    )
    scheduler = await start_scheduler(args)
    channel = aio_channel(f"127.0.0.1:{scheduler.port}")
    try:
        yield scheduler_pb2_grpc.SchedulerStub(channel), scheduler
    finally:
        await channel.close()
        await scheduler.stop()


def gen_request(rid, prompt, max_new):
    return scheduler_pb2.SchedulerGenerateRequest(
        request_id=rid,
        input_ids=prompt,
        stopping=common_pb2.StoppingCriteria(max_new_tokens=max_new, ignore_eos=True),
    )


async def tokens_or_error(stub, request) -> list[int] | grpc.aio.AioRpcError:
    tokens = []
    try:
        async for msg in stub.Generate(request):
            tokens += msg.token_ids
    except grpc.aio.AioRpcError as e:
        return e
    return tokens


async def info(stub) -> scheduler_pb2.SchedulerInfo:
    return await stub.GetInfo(scheduler_pb2.SchedulerInfoRequest())


def run(coro):
    asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_executor_restart_fails_running_requests_and_runs_queued_ones():
    async def body():
        server, port = await serve_executor(GatedExecutor())
        async with scheduler_over(port, max_running_requests=2) as (stub, _):
            prompts = {f"r{i}": [i + 1, 7, 7] for i in range(5)}
            calls = {
                rid: asyncio.create_task(tokens_or_error(stub, gen_request(rid, p, 100)))
                for rid, p in prompts.items()
            }
            while ((now := await info(stub)).running_requests, now.waiting_requests) != (2, 3):
                await asyncio.sleep(0.01)
            await server.stop(None)  # the executor dies mid-step
            failed, _ = await asyncio.wait(
                calls.values(), timeout=5, return_when=asyncio.FIRST_COMPLETED
            )
            await asyncio.sleep(0.2)
            failed = [call for call in calls.values() if call.done()]
            assert len(failed) == 2
            for call in failed:
                error = call.result()
                assert isinstance(error, grpc.aio.AioRpcError), error
                assert error.code() == grpc.StatusCode.UNAVAILABLE and "executor" in error.details()
            calls = {rid: call for rid, call in calls.items() if call not in failed}
            down = await info(stub)
            assert (
                down.executor_unavailable
                and down.waiting_requests == 3
                and down.running_requests == 0
            )
            late = asyncio.create_task(tokens_or_error(stub, gen_request("late", [9, 9], 4)))
            await asyncio.sleep(0.3)
            assert not any(c.done() for c in calls.values()) and not late.done()

            server, _ = await serve_executor(GatedExecutor(), port)  # the launcher restarted it
            for rid, call in calls.items():
                assert await call == reference_tokens(prompts[rid], 100, VOCAB), rid
            assert await late == reference_tokens([9, 9], 4, VOCAB)
            up = await info(stub)
            assert not up.executor_unavailable and up.in_use_tokens == 0
        await server.stop(None)

    run(body())


def test_hung_step_hits_its_deadline_then_the_executor_is_used_again():
    async def body():
        executor = GatedExecutor()
        server, port = await serve_executor(executor)
        watchdog = 0.3
        async with scheduler_over(port, watchdog_timeout=watchdog) as (stub, _):
            assert await tokens_or_error(stub, gen_request("ok", [1, 2], 3)) == reference_tokens(
                [1, 2], 3, VOCAB
            )
            executor.released.clear()
            started = asyncio.get_running_loop().time()
            error = await tokens_or_error(stub, gen_request("hung", [3, 4], 3))
            waited = asyncio.get_running_loop().time() - started
            assert (
                isinstance(error, grpc.aio.AioRpcError) and "DEADLINE_EXCEEDED" in error.details()
            )
            assert step_deadline(watchdog) <= waited < step_deadline(watchdog) + 3
            assert step_deadline(0) is None  # --watchdog-timeout 0: no watchdog, no deadline
            executor.released.set()
            assert await tokens_or_error(stub, gen_request("after", [5, 6], 3)) == reference_tokens(
                [5, 6], 3, VOCAB
            )
        await server.stop(None)

    run(body())


def test_executor_back_with_another_model_stops_the_loop():
    async def body():
        server, port = await serve_executor(GatedExecutor())
        async with scheduler_over(port) as (stub, scheduler):
            await server.stop(None)
            while not (
                await info(stub)
            ).executor_unavailable:  # noticed while idle: its step session ended
                await asyncio.sleep(0.01)
            other = GatedExecutor()
            other.model.vocab_size = VOCAB * 2
            server, _ = await serve_executor(other, port)
            with pytest.raises(ExecutorChanged, match="vocab 2000"):
                await asyncio.wait_for(scheduler.loop_task, 10)
        await server.stop(None)

    run(body())
