"""The gateway's SchedulerSession: many requests over one stream, failure of the stream, reconnection."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest

from radixserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from radixserve.common.sampling import SamplingParams, StoppingCriteria
from radixserve.gateway.pipeline.scheduler_session import RequestFailed, SchedulerSession
from tests.stack import free_ports
from tests.gateway.fakes import FAIL_MARKER, OUTPUT_TEXT, POISON, FakeScheduler, encode


def serve_fake(port: int, scheduler: FakeScheduler) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def request(rid: str, prompt: str, max_new: int) -> scheduler_pb2.SchedulerGenerateRequest:
    return scheduler_pb2.SchedulerGenerateRequest(
        request_id=rid,
        input_ids=encode(prompt),
        stopping=common_pb2.StoppingCriteria(max_new_tokens=max_new, ignore_eos=True),
    )


async def collect(events) -> tuple[str, int]:
    text, reason = "", 0
    async for msg in events:
        text += "".join(map(chr, msg.token_ids))
        reason = msg.finish_reason
    return text, reason


class FakeSchedulerServer:
    """A FakeScheduler served on a fixed port, so a test can stop it and serve a new one there."""

    def __init__(self, scheduler: FakeScheduler):
        self.port = free_ports(1)[0]
        self.server = serve_fake(self.port, scheduler)

    def restart(self, scheduler: FakeScheduler) -> None:
        self.server = serve_fake(self.port, scheduler)


def run_with_session(fake: FakeScheduler, body) -> None:
    """Run body(session, served) against fake, with a gateway SchedulerSession on its own channel."""
    served = FakeSchedulerServer(fake)

    async def main():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{served.port}")
        session = SchedulerSession(lambda: scheduler_pb2_grpc.SchedulerStub(channel))
        try:
            await body(session, served)
        finally:
            await session.close()
            await channel.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        served.server.stop(0).wait()


def test_concurrent_requests_share_one_stream_and_errors_stay_per_request():
    fake = FakeScheduler(step_delay=0.002)

    async def body(session, _):
        good = [session.start(request(f"g{i}", "hi", 6)) for i in range(5)]
        poisoned = session.start(request("p", POISON, 6))
        failing = session.start(request("f", FAIL_MARKER, 20))
        results = await asyncio.gather(*(collect(e) for e in good))
        assert results == [(OUTPUT_TEXT[:6], common_pb2.FINISH_REASON_LENGTH)] * 5
        with pytest.raises(RequestFailed) as err:
            await collect(poisoned)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(RequestFailed) as err:
            await collect(failing)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert len(fake.started) == 6 and fake.sessions == 1  # one stream carried them all

    run_with_session(fake, body)


def test_closing_a_request_aborts_it_in_the_scheduler():
    fake = FakeScheduler(step_delay=0.01)

    async def body(session, _):
        events = session.start(request("long", "hi", 200))
        await anext(events)
        events.close()
        for _ in range(200):
            if "long" in fake.cancelled:
                break
            await asyncio.sleep(0.01)
        assert fake.cancelled == ["long"]

    run_with_session(fake, body)


def test_a_broken_stream_fails_open_requests_and_the_next_request_reconnects():
    async def body(session, served):
        events = session.start(request("cut", "hi", 200))
        await anext(events)
        await asyncio.to_thread(lambda: served.server.stop(0).wait())
        with pytest.raises(RequestFailed) as err:
            await collect(events)
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        served.restart(FakeScheduler())
        for _ in range(100):  # the channel reconnects with backoff
            try:
                assert await collect(session.start(request("after", "hi", 3))) == (
                    OUTPUT_TEXT[:3],
                    common_pb2.FINISH_REASON_LENGTH,
                )
                break
            except RequestFailed:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("no request succeeded after the scheduler came back")

    run_with_session(FakeScheduler(step_delay=0.01), body)


def test_an_id_already_open_is_a_400_not_a_server_error():
    from radixserve.common.args import ServerArgs
    from radixserve.gateway.pipeline.engine import Engine
    from radixserve.gateway.api.errors import ApiError
    from radixserve.gateway.pipeline.generation import PreparedRequest
    from tests.gateway.fakes import FakeBackends

    fakes = FakeBackends(step_delay=0.01)
    engine = Engine(
        ServerArgs(
            tokenizer_addr=fakes.tokenizer_addr,
            scheduler_addr=fakes.scheduler_addr,
            detokenizer_addr=fakes.detokenizer_addr,
        )
    )

    def prepared() -> PreparedRequest:
        return PreparedRequest(
            "same-id",
            encode("hi"),
            SamplingParams(),
            StoppingCriteria(max_new_tokens=50, ignore_eos=True),
            stop=[],
            skip_special_tokens=True,
        )

    async def main():
        first = engine.stream(prepared())
        await first.__anext__()  # running
        with pytest.raises(ApiError) as err:
            await engine.stream(prepared()).__anext__()
        assert err.value.status == 400 and "same-id" in err.value.message
        await first.aclose()
        await engine.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        fakes.stop()


def test_the_api_error_names_the_stage_from_the_detail_not_the_message_prefix():
    from radixserve.gateway.pipeline.engine import request_failure

    executor = request_failure(
        RequestFailed(
            grpc.StatusCode.UNAVAILABLE,
            "step 7 lost its worker",
            scheduler_pb2.FAILED_STAGE_EXECUTOR,
        )
    )
    assert (executor.status, executor.body()) == (
        503,
        {
            "error": {
                "message": "the executor service failed while running this request; retry it",
                "type": "service_unavailable_error",
                "param": None,
                "code": "service_unavailable",
            }
        },
    )
    scheduler = request_failure(
        RequestFailed(
            grpc.StatusCode.UNAVAILABLE,
            "executor-shaped words from the scheduler",
            scheduler_pb2.FAILED_STAGE_SCHEDULER,
        )
    )
    assert (scheduler.status, scheduler.body()) == (
        503,
        {
            "error": {
                "message": "the scheduler service is unavailable",
                "type": "service_unavailable_error",
                "param": None,
                "code": "service_unavailable",
            }
        },
    )
