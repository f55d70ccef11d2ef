"""The real gRPC scheduler in-process against a fake executor servicer, on ephemeral ports."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from radixserve.v1 import common_pb2, executor_pb2_grpc, scheduler_pb2
from radixserve.common.args import ServerArgs
from radixserve.common.grpc_util import aio_server, bind
from tests.fake_executor import FakeExecutorServicer
from radixserve.scheduler.server import start_scheduler
from tests.scheduler.server_stack import KV_SLOTS, collect, gen_request, run, stack, wait_idle
from tests.scheduler.harness import VOCAB, reference_tokens


def test_generate_streams_tokens_with_usage():
    async def body():
        async with stack() as (stub, _, _):
            msgs = await collect(stub, gen_request("a", [1, 2, 3], max_new=6, return_logprob=True))
            assert [t for m in msgs for t in m.token_ids] == reference_tokens([1, 2, 3], 6)
            assert len(msgs) == 6 and all(len(m.logprobs) == 1 for m in msgs)
            assert msgs[0].usage.prompt_tokens == 3
            assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
            last = msgs[-1]
            assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert (
                last.usage.prompt_tokens,
                last.usage.completion_tokens,
                last.usage.cached_tokens,
            ) == (3, 6, 0)

    run(body())


def test_concurrent_requests_and_cached_tokens():
    async def body():
        async with stack() as (stub, _, _):
            shared = list(range(10, 30))
            await collect(stub, gen_request("warm", shared + [1], max_new=2))
            results = await asyncio.gather(
                *(
                    collect(stub, gen_request(f"r{i}", shared + [i + 2], max_new=4))
                    for i in range(4)
                )
            )
            for i, msgs in enumerate(results):
                assert [t for m in msgs for t in m.token_ids] == reference_tokens(
                    shared + [i + 2], 4
                )
                assert msgs[0].usage.cached_tokens == len(shared)
                assert msgs[-1].usage.cached_tokens == len(shared)
            info = await wait_idle(stub)
            assert info.total_prompt_tokens == 21 * 5
            assert info.total_cached_prompt_tokens == 20 * 4
            assert info.free_tokens + info.cached_tokens == KV_SLOTS - 1

    run(body())


def test_invalid_arguments():
    async def body():
        async with stack(context_length=64) as (stub, _, _):
            for request, fragment in [
                (gen_request("long", [1] * 60, max_new=5), "context length"),
                (gen_request("empty", [], max_new=5), "at least one token"),
                (gen_request("vocab", [1, VOCAB], max_new=5), "vocabulary"),
                (gen_request("zero", [1], max_new=0), "max_new_tokens"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await collect(stub, request)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert fragment in err.value.details()

    run(body())


def test_duplicate_request_id_is_rejected():
    async def body():
        async with stack() as (stub, executor, _):
            executor.step_delay = 0.01
            call = stub.Generate(gen_request("dup", [1, 2], max_new=50))
            await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, gen_request("dup", [3], max_new=2))
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
            call.cancel()

    run(body())


@pytest.mark.parametrize("disable_overlap", [False, True])
def test_client_cancellation_frees_kv(disable_overlap):
    async def body():
        async with stack(disable_overlap_schedule=disable_overlap) as (stub, executor, _):
            executor.step_delay = 0.01
            call = stub.Generate(gen_request("c", [1, 2, 3, 4], max_new=100))
            await call.read()
            await call.read()
            info = await stub.GetInfo(scheduler_pb2.SchedulerInfoRequest())
            assert info.running_requests == 1 and info.in_use_tokens > 0
            call.cancel()
            info = await wait_idle(stub)
            assert info.free_tokens + info.cached_tokens == KV_SLOTS - 1
            flushed = await stub.FlushCache(scheduler_pb2.SchedulerFlushCacheRequest())
            assert flushed.freed_tokens == info.cached_tokens > 0
            info = await stub.GetInfo(scheduler_pb2.SchedulerInfoRequest())
            assert info.free_tokens == KV_SLOTS - 1

    run(body())


def stream_fields(msgs):
    return [
        (
            list(m.token_ids),
            m.finish_reason,
            m.matched_stop_token_id,
            m.usage.prompt_tokens,
            m.usage.completion_tokens,
            m.usage.cached_tokens,
        )
        for m in msgs
    ]


def test_overlap_and_serial_streams_are_identical():
    shared = list(range(10, 26))
    eos = {reference_tokens(shared + [1], 8)[3], reference_tokens(shared + [2], 8)[0]}
    stop = reference_tokens(shared + [3], 8)[5]

    async def traffic(disable_overlap):
        async with stack(eos_token_ids=tuple(eos), disable_overlap_schedule=disable_overlap) as (
            stub,
            executor,
            sched,
        ):
            executor.step_delay = 0.002
            await collect(
                stub, gen_request("warm", shared + [0], max_new=1)
            )  # cached: deterministic
            requests = [
                gen_request(f"r{i}", shared + [i], max_new=8, ignore_eos=False) for i in range(1, 5)
            ]
            requests[2].stopping.stop_token_ids.append(stop)
            requests.append(gen_request("long", [7, 7, 7], max_new=20))
            streams = await asyncio.gather(*(collect(stub, r) for r in requests))
            # A follow-up whose prompt extends a finished request reuses the same cached prefix.
            first = [t for m in streams[0] for t in m.token_ids]
            streams.append(
                await collect(stub, gen_request("next", shared + [1] + first + [9], max_new=3))
            )
            await wait_idle(stub)
            # Every step went over the step session's one Executor.Steps stream, none as a unary Step.
            assert executor.rpc_methods.count("Steps") == 1, executor.rpc_methods
            assert "Step" not in executor.rpc_methods
            return [stream_fields(s) for s in streams], executor.max_concurrent_steps

    async def body():
        overlapped, overlap_depth = await traffic(False)
        serial, serial_depth = await traffic(True)
        assert (overlap_depth, serial_depth) == (2, 1)  # the stream takes a step while one runs
        assert overlapped == serial
        tokens = [[t for m in s for t in m[0]] for s in overlapped]
        assert tokens[0] == reference_tokens(shared + [1], 4) and tokens[1] == reference_tokens(
            shared + [2], 1
        )
        assert tokens[2] == reference_tokens(shared + [3], 6) and len(tokens[4]) == 20
        assert (
            overlapped[5][-1][5] == len(shared) + 1 + 3
        )  # cached: prompt and all but the last token

    run(body())


def test_abort_rpc_ends_stream_with_abort():
    async def body():
        async with stack() as (stub, executor, _):
            executor.step_delay = 0.01
            call = stub.Generate(gen_request("x", [5, 6], max_new=100))
            await call.read()
            resp = await stub.Abort(scheduler_pb2.SchedulerAbortRequest(request_ids=["x", "nope"]))
            assert resp.aborted == 1
            rest = []
            while (msg := await call.read()) is not grpc.aio.EOF:
                rest.append(msg)
            assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
            await wait_idle(stub)

    run(body())


def test_executor_failure_fails_requests_then_recovers():
    async def body():
        async with stack() as (stub, executor, _):
            executor.fail_steps = True
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, gen_request("f", [1, 2], max_new=3))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            executor.fail_steps = False
            msgs = await collect(stub, gen_request("g", [1, 2], max_new=3))
            assert [t for m in msgs for t in m.token_ids] == reference_tokens([1, 2], 3)

    run(body())


def test_failed_step_with_another_in_flight_fails_all_then_recovers():
    async def body():
        async with stack() as (stub, executor, sched):
            executor.step_delay = 0.005
            executor.fail_step_ids = {4}
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, gen_request("f", [1, 2], max_new=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert executor.max_concurrent_steps == 2
            msgs = await collect(stub, gen_request("g", [1, 2], max_new=5))
            assert [t for m in msgs for t in m.token_ids] == reference_tokens([1, 2], 5)
            info = await wait_idle(stub)
            assert info.free_tokens + info.cached_tokens == KV_SLOTS - 1
            assert not sched.runtime.inflight

    run(body())


def test_get_info_reports_model_and_config():
    async def body():
        async with stack(max_total_tokens=200, schedule_policy="lpm") as (stub, _, _):
            info = await stub.GetInfo(scheduler_pb2.SchedulerInfoRequest())
            assert info.architecture == "FakeForCausalLM" and info.vocab_size == VOCAB
            assert info.max_total_tokens == 200 and info.free_tokens == 200
            assert info.context_length == 128
            # the executor's KV pool as tests/fake_executor.py describes it, passed through
            assert info.kv_cache_dtype == "float32" and info.kv_bytes_per_token == 64
            config = json.loads(info.config_json)
            assert config["schedule_policy"] == "lpm" and config["max_running_requests"] == 1

    run(body())


def test_scheduler_waits_for_a_late_executor():
    async def body():
        executor = FakeExecutorServicer(kv_slots=KV_SLOTS, vocab_size=VOCAB)
        exec_server = aio_server()
        executor_pb2_grpc.add_ExecutorServicer_to_server(executor, exec_server)
        port = bind(exec_server, "127.0.0.1:0")
        args = ServerArgs(scheduler_addr="127.0.0.1:0", executor_addr=f"127.0.0.1:{port}")
        starting = asyncio.create_task(start_scheduler(args))
        await asyncio.sleep(0.3)
        assert not starting.done()
        await exec_server.start()
        scheduler = await starting
        await scheduler.stop()
        await exec_server.stop(None)

    run(body())
