"""The scheduler's Session stream: many requests over one gRPC stream, events batched per step."""

from __future__ import annotations

import grpc

from radixserve.v1 import common_pb2, scheduler_pb2
from tests.scheduler.harness import reference_tokens
from tests.scheduler.server_stack import KV_SLOTS, gen_request, run, stack, wait_idle


class SessionClient:
    """Writes actions and reads batches of a raw Session call."""

    def __init__(self, stub):
        self.call = stub.Session()

    async def generate(self, request) -> None:
        await self.call.write(scheduler_pb2.SchedulerSessionRequest(generate=request))

    async def abort(self, *request_ids) -> None:
        await self.call.write(
            scheduler_pb2.SchedulerSessionRequest(
                abort=scheduler_pb2.SchedulerAbortRequest(request_ids=request_ids)
            )
        )

    async def read_until_done(self, request_ids: set[str]):
        """Batches read until every id finished or failed; returns (batches, tokens, last events, errors)."""
        batches, tokens, last, errors = [], {rid: [] for rid in request_ids}, {}, {}
        while set(last) | set(errors) != request_ids:
            batch = await self.call.read()
            assert batch is not grpc.aio.EOF
            batches.append(batch)
            for event in batch.events:
                assert event.request_id not in last, "an event after the request's last one"
                tokens[event.request_id] += event.token_ids
                if event.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    last[event.request_id] = event
            for error in batch.errors:
                errors[error.request_id] = error
        return batches, tokens, last, errors


def test_session_multiplexes_requests_with_one_message_per_step():
    async def body():
        async with stack(max_running_requests=8) as (stub, executor, _):
            executor.step_delay = 0.005
            session = SessionClient(stub)
            prompts = {f"r{i}": [1 + i, 2, 3, 4] for i in range(6)}
            for rid, prompt in prompts.items():
                await session.generate(gen_request(rid, prompt, max_new=8))
            batches, tokens, last, errors = await session.read_until_done(set(prompts))
            assert not errors
            for rid, prompt in prompts.items():
                assert tokens[rid] == reference_tokens(prompt, 8)
                assert last[rid].finish_reason == common_pb2.FINISH_REASON_LENGTH
                assert last[rid].usage.completion_tokens == 8
            # Each step's tokens for all running requests travel in one message, and no message
            # carries two events of one request.
            assert max(len(b.events) for b in batches) == len(prompts)
            assert len(batches) < sum(len(t) for t in tokens.values()) / 2
            for b in batches:
                ids = [e.request_id for e in b.events]
                assert len(ids) == len(set(ids))
            session.call.cancel()
            await wait_idle(stub)

    run(body())


def test_session_rejects_bad_requests_without_ending_the_others():
    async def body():
        async with stack() as (stub, executor, _):
            executor.step_delay = 0.005
            session = SessionClient(stub)
            await session.generate(gen_request("good", [1, 2, 3], max_new=6))
            await session.generate(gen_request("", [1, 2], max_new=2))
            await session.generate(gen_request("bad-token", [10**6], max_new=2))
            _, tokens, last, errors = await session.read_until_done({"good", "", "bad-token"})
            assert errors[""].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert errors["bad-token"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "vocabulary" in errors["bad-token"].message
            assert {e.failed_stage for e in errors.values()} == {
                scheduler_pb2.FAILED_STAGE_SCHEDULER
            }
            assert tokens["good"] == reference_tokens([1, 2, 3], 6)
            assert last["good"].finish_reason == common_pb2.FINISH_REASON_LENGTH
            session.call.cancel()

    run(body())


def test_session_rejects_a_duplicate_id_and_keeps_the_original():
    async def body():
        async with stack() as (stub, executor, _):
            executor.step_delay = 0.005
            session = SessionClient(stub)
            await session.generate(gen_request("dup", [1, 2, 3], max_new=6))
            await session.generate(gen_request("dup", [4, 5], max_new=2))
            tokens, codes, finished = [], [], None
            while finished is None:
                batch = await session.call.read()
                codes += [e.code for e in batch.errors if e.request_id == "dup"]
                for event in batch.events:
                    tokens += event.token_ids
                    if event.finish_reason:
                        finished = event.finish_reason
            assert codes == [grpc.StatusCode.ALREADY_EXISTS.value[0]]
            assert (
                tokens == reference_tokens([1, 2, 3], 6)
                and finished == common_pb2.FINISH_REASON_LENGTH
            )
            session.call.cancel()

    run(body())


def test_session_abort_action_and_closing_the_stream_free_the_kv():
    async def body():
        async with stack() as (stub, executor, _):
            executor.step_delay = 0.01
            session = SessionClient(stub)
            await session.generate(gen_request("kept", [1, 2, 3], max_new=100))
            await session.generate(gen_request("aborted", [4, 5, 6], max_new=100))
            await session.call.read()
            await session.abort("aborted")
            _, _, last, _ = await session.read_until_done({"aborted"})
            assert last["aborted"].finish_reason == common_pb2.FINISH_REASON_ABORT
            info = await stub.GetInfo(scheduler_pb2.SchedulerInfoRequest())
            assert info.running_requests == 1
            session.call.cancel()  # the gateway went away: its requests are aborted
            info = await wait_idle(stub)
            assert info.free_tokens + info.cached_tokens == KV_SLOTS - 1

    run(body())


def test_executor_failure_reaches_every_session_request_as_an_error():
    async def body():
        async with stack() as (stub, executor, _):
            executor.fail_steps = True
            session = SessionClient(stub)
            await session.generate(gen_request("x", [1, 2], max_new=3))
            await session.generate(gen_request("y", [3, 4], max_new=3))
            _, _, _, errors = await session.read_until_done({"x", "y"})
            assert {e.code for e in errors.values()} == {grpc.StatusCode.UNAVAILABLE.value[0]}
            assert {e.failed_stage for e in errors.values()} == {
                scheduler_pb2.FAILED_STAGE_EXECUTOR
            }
            executor.fail_steps = False
            await session.generate(gen_request("z", [1, 2], max_new=3))
            _, tokens, _, errors = await session.read_until_done({"z"})
            assert not errors and tokens["z"] == reference_tokens([1, 2], 3)
            session.call.cancel()

    run(body())


def test_half_closed_session_ends_after_its_requests_finish():
    async def body():
        async with stack() as (stub, _, _):
            session = SessionClient(stub)
            await session.generate(gen_request("a", [1, 2], max_new=4))
            await session.call.done_writing()
            tokens = []
            while (batch := await session.call.read()) is not grpc.aio.EOF:
                tokens += [t for e in batch.events for t in e.token_ids]
            assert tokens == reference_tokens([1, 2], 4)
            assert await session.call.code() == grpc.StatusCode.OK

    run(body())
