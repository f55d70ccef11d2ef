"""Request amplification and timeouts that stop work (issue 17): the sequences one request may ask for
(prompts x n, /generate batches, embedding inputs) are capped by --max-request-sequences and counted
against --max-queued-requests as one group (more than the queue holds: 400; not fitting now: 503), and
--request-timeout ends a request in every stage (tokenizing, queued, running; REST, gRPC API, embeddings)
with its sequences out of the scheduler within a step, while other requests go on.

Real scheduler (paced fake executor) behind the real gateway; fake tokenizer and detokenizer."""

from __future__ import annotations

import asyncio
import contextlib
import time
import tracemalloc
from dataclasses import dataclass

import grpc
import httpx

from radixserve.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2_grpc,
)
from radixserve.scheduler.core import Scheduler
from tests.configs import scheduler_config
from radixserve.scheduler.embed_batcher import EmbedBatcher, EmbedFailed
from radixserve.common.sampling import StoppingCriteria
from radixserve.scheduler.request import Request
from radixserve.scheduler.runtime import SchedulerRuntime
from tests.gateway.real_scheduler import (
    MESSAGES,
    VOCAB,
    Stack,
    read_stream,
    scheduler_on_fake_executor,
    sse_payloads,
)
from tests.gateway.fakes import FakeBackends, FakeTokenizer, encode, gateway_client

MODEL = "fake-model"
LONG = 2048  # tokens: 4 ms a step, so a sequence of them runs far past every timeout here


class SlowTokenizer(FakeTokenizer):
    """The fake tokenizer, taking `delay` seconds per Encode call (a tokenizer under load)."""

    def __init__(self):
        self.delay = 0.0
        self.encodes = 0

    def Encode(self, request, context):
        self.encodes += 1
        time.sleep(self.delay)
        return super().Encode(request, context)


@dataclass
class AmpStack(Stack):
    tokenizer: SlowTokenizer = None
    grpc_addr: str = ""

    async def sequences_in_scheduler(self) -> int:
        info = await self.server_info()
        return info["running_requests"] + info["waiting_requests"]


@contextlib.asynccontextmanager
async def generation_stack(tmp_path, **flags):
    backends = (
        FakeBackends()
    )  # its detokenizer and (slowed) tokenizer; the scheduler is the real one
    tokenizer = SlowTokenizer()
    backends.tokenizer_server.stop(0).wait()
    backends.tokenizer = tokenizer
    backends.tokenizer_addr = backends._serve(
        "tokenizer", tokenizer_pb2_grpc.add_TokenizerServicer_to_server, tokenizer
    )
    scheduler, stop = await scheduler_on_fake_executor(**flags)
    try:
        async with gateway_client(
            backends.tokenizer_addr,
            f"127.0.0.1:{scheduler.port}",
            backends.detokenizer_addr,
            served_model_name=MODEL,
            file_storage_path=str(tmp_path),
            **flags,
        ) as (client, gateway):
            yield AmpStack(
                client, scheduler.runtime.core, gateway, tokenizer, f"127.0.0.1:{gateway.grpc_port}"
            )
    finally:
        await stop()
        backends.stop()


def run(coro, timeout: float = 90):
    asyncio.run(asyncio.wait_for(coro, timeout))


def error_of(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


# ---- --max-request-sequences ----


def test_800_prompts_times_n_128_is_a_400_naming_the_limit_before_any_work(tmp_path):
    async def main():
        async with generation_stack(tmp_path) as stack:
            body = {"model": MODEL, "prompt": ["a"] * 800, "n": 128, "max_tokens": 16}
            tracemalloc.start()
            try:
                started = time.monotonic()
                # The 5 KB body that used to become 102,400 sequences (and a 1 GB gateway).
                resp = await stack.client.post("/v1/completions", json=body, timeout=10)
                elapsed = time.monotonic() - started
                streamed = await stack.client.post(
                    "/v1/completions", json={**body, "stream": True}, timeout=10
                )
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            error = error_of(resp, 400, "too_many_sequences")
            assert (
                "102400 sequences" in error["message"]
                and "--max-request-sequences" in error["message"]
            )
            assert "256" in error["message"] and error["param"] == "n"
            error_of(streamed, 400, "too_many_sequences")
            assert elapsed < 1.0
            assert peak < 20 * 2**20, f"{peak / 2**20:.1f} MB traced while answering"
            # Refused before any tokenizing, and nothing reached the scheduler.
            assert (
                stack.tokenizer.encodes == 0
                and stack.core.total_prompt_tokens == 0
                and not stack.core.requests
            )

            batch = await stack.client.post("/generate", json={"text": ["a"] * 300}, timeout=10)
            assert (
                "--max-request-sequences" in error_of(batch, 400, "too_many_sequences")["message"]
            )
            assert stack.tokenizer.encodes == 0
            await stack.assert_idle_without_leaks()

    run(main())


def test_a_request_of_exactly_max_request_sequences_is_served(tmp_path):
    async def main():
        async with generation_stack(tmp_path) as stack:
            # 2 prompts x n 128 = 256, the default limit: more than --max-running-requests (128 here), so
            # half of the group waits while the other half runs.
            resp = await stack.client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": ["Once", "Twice"], "n": 128, "max_tokens": 2},
                timeout=30,
            )
            assert resp.status_code == 200, resp.text
            choices = resp.json()["choices"]
            assert [c["index"] for c in choices] == list(range(256))
            assert {c["finish_reason"] for c in choices} == {"length"}
            assert resp.json()["usage"]["completion_tokens"] == 512
            one_more = await stack.client.post(
                "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": ["Once", "Twice", "Thrice"],
                    "n": 86,
                    "max_tokens": 2,
                },
                timeout=30,
            )
            assert (
                "258 sequences (3 prompts x n=86)"
                in error_of(one_more, 400, "too_many_sequences")["message"]
            )
            await stack.assert_idle_without_leaks()

    run(main())


# ---- --max-queued-requests counts a request's sequences together ----


def test_more_sequences_than_the_queue_holds_is_a_400_and_not_fitting_now_a_503(tmp_path):
    async def main():
        async with generation_stack(
            tmp_path, max_running_requests=1, max_queued_requests=64
        ) as stack:
            client = stack.client
            # Idle server: n 100 can never be queued with a limit of 64; retrying would never succeed.
            never = await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "n": 100},
            )
            error = error_of(never, 400, "too_many_sequences")
            assert (
                "--max-queued-requests" in error["message"] and "retry-after" not in never.headers
            )
            assert stack.tokenizer.encodes == 0 and not stack.core.requests

            # One running, 60 waiting: 5 more do not fit now (503, retry later); none of the 5 is queued.
            long = {"model": MODEL, "prompt": "Once", "max_tokens": LONG, "stream": True}
            running = asyncio.create_task(read_stream(client, "/v1/completions", long))
            await stack.wait_for(lambda i: i["running_requests"] == 1)
            queued = asyncio.create_task(read_stream(client, "/v1/completions", {**long, "n": 60}))
            await stack.wait_for(lambda i: i["waiting_requests"] == 60)
            busy = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, "n": 5}
            )
            error = error_of(busy, 503, "resource_exhausted")
            assert (
                busy.headers["retry-after"] == "1" and error["type"] == "service_unavailable_error"
            )
            assert "60 requests are already waiting" in error["message"]
            assert len(stack.core.requests) == 61 and len(stack.core.waiting) == 60
            # 4 fit: all of them are queued.
            fits = asyncio.create_task(read_stream(client, "/v1/completions", {**long, "n": 4}))
            await stack.wait_for(lambda i: i["waiting_requests"] == 64)

            await client.post("/abort_request", json={"abort_all": True})
            for task in (running, queued, fits):
                reasons = [
                    c["choices"][0]["finish_reason"]
                    for c in sse_payloads(await task)
                    if c["choices"] and c["choices"][0]["finish_reason"]
                ]
                assert reasons and set(reasons) == {"abort"}
            await stack.assert_idle_without_leaks()

    run(main())


def test_a_session_group_is_queued_all_or_none():
    """The scheduler's side: a generate_group is admitted against --max-queued-requests as a whole, and
    aborting one member while the group is prepared leaves the others running."""

    async def main():
        scheduler, stop = await scheduler_on_fake_executor(
            max_running_requests=1, max_queued_requests=3
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{scheduler.port}")
        outbox: asyncio.Queue = asyncio.Queue()

        async def actions():
            while (action := await outbox.get()) is not None:
                yield action

        def group(*ids, tokens=LONG):
            return scheduler_pb2.SchedulerSessionRequest(
                generate_group=scheduler_pb2.SchedulerGenerateGroup(
                    requests=[
                        scheduler_pb2.SchedulerGenerateRequest(
                            request_id=rid,
                            input_ids=encode("hi"),
                            stopping=common_pb2.StoppingCriteria(
                                max_new_tokens=tokens, ignore_eos=True
                            ),
                        )
                        for rid in ids
                    ]
                )
            )

        try:
            call = scheduler_pb2_grpc.SchedulerStub(channel).Session(actions())
            errors: dict[str, int] = {}
            finished: dict[str, int] = {}

            async def until(predicate):
                while not predicate():
                    msg = await call.read()
                    assert msg is not grpc.aio.EOF
                    for error in msg.errors:
                        errors[error.request_id] = error.code
                    for event in msg.events:
                        if event.finish_reason:
                            finished[event.request_id] = event.finish_reason

            core = scheduler.runtime.core
            outbox.put_nowait(
                group("too-1", "too-2", "too-3", "too-4")
            )  # more than the queue holds
            await until(lambda: len(errors) == 4)
            assert (
                set(errors.values()) == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
                and not core.requests
            )
            outbox.put_nowait(group("a", "b", "c"))  # one runs, two wait
            await asyncio.sleep(0.3)
            assert len(core.running) == 1 and len(core.waiting) == 2
            outbox.put_nowait(group("d", "e"))  # 2 + 2 > 3: neither is queued
            await until(lambda: "d" in errors and "e" in errors)
            assert errors["d"] == errors["e"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert sorted(core.requests) == ["a", "b", "c"]
            # One batch abort takes them all out, the queued ones included.
            outbox.put_nowait(
                scheduler_pb2.SchedulerSessionRequest(
                    abort=scheduler_pb2.SchedulerAbortRequest(request_ids=["a", "b", "c"])
                )
            )
            await until(lambda: {"a", "b", "c"} <= set(finished))
            assert set(finished.values()) == {common_pb2.FINISH_REASON_ABORT}
            assert not core.requests and not core.waiting and not core.running
            # A group member aborted right behind its start ends (CANCELLED if it had not been queued yet);
            # the rest of the group runs.
            outbox.put_nowait(group("f", "g", tokens=3))
            outbox.put_nowait(
                scheduler_pb2.SchedulerSessionRequest(
                    abort=scheduler_pb2.SchedulerAbortRequest(request_ids=["f"])
                )
            )
            await until(lambda: "g" in finished and ("f" in errors or "f" in finished))
            assert (
                errors.get("f") == grpc.StatusCode.CANCELLED.value[0]
                or finished.get("f") == common_pb2.FINISH_REASON_ABORT
            )
            assert finished["g"] == common_pb2.FINISH_REASON_LENGTH
            outbox.put_nowait(None)
            await asyncio.sleep(0.1)
            assert not core.requests and core.check_leak(deep=True) is None
        finally:
            await channel.close()
            await stop()

    run(main(), timeout=60)


def test_aborting_a_request_of_many_queued_sequences_is_one_cheap_batch():
    """30,000 queued sequences leave the scheduler in one O(n) pass. A list removal per sequence made this
    quadratic: about 14 s for 20,000 and 100 s for 50,000 on a test machine, minutes of a blocked
    scheduler loop for the 102,400 of the 800 x 128 attack."""

    async def main():
        core = Scheduler(
            scheduler_config(max_running_requests=256), pool_size=4096, context_length=1024
        )
        runtime = SchedulerRuntime(core, executor=None)
        delivered = []
        for i in range(30_000):
            runtime.submit(
                Request(
                    request_id=f"cmpl-x-{i}", prompt_ids=[1, 2, 3], stopping=StoppingCriteria(16)
                ),
                delivered.append,
            )
        other = Request(request_id="small", prompt_ids=[4, 5], stopping=StoppingCriteria(2))
        runtime.submit(other, delivered.append)
        ids = [f"cmpl-x-{i}" for i in reversed(range(30_000))]
        started = time.perf_counter()
        aborted = runtime.abort(ids, abort_all=False)
        elapsed = time.perf_counter() - started
        assert aborted == 30_000 and len(delivered) == 30_000
        assert {e.finish_reason.name for e in delivered} == {"ABORT"}
        assert core.waiting == [other] and list(core.requests) == ["small"]
        assert elapsed < 4.0, f"{elapsed:.2f}s to abort"  # about 0.5 s

    run(main(), timeout=120)


# ---- --request-timeout in every stage ----


def test_request_timeout_takes_a_many_sequence_request_out_of_the_scheduler(tmp_path):
    async def main():
        async with generation_stack(tmp_path, request_timeout=2, max_running_requests=16) as stack:
            client = stack.client
            # 4 prompts x n 64 = 256 long sequences (1000 tokens: 16 of them fit the KV pool's admission
            # estimate): 16 run, 240 wait.
            started = time.monotonic()
            big = asyncio.create_task(
                client.post(
                    "/v1/completions",
                    json={
                        "model": MODEL,
                        "prompt": ["Once", "upon", "a", "time"],
                        "n": 64,
                        "max_tokens": 1000,
                    },
                    timeout=30,
                )
            )
            await stack.wait_for(
                lambda i: i["running_requests"] == 16 and i["waiting_requests"] == 240
            )
            await asyncio.sleep(max(0.0, started + 1.0 - time.monotonic()))
            # A small request queued behind all of them answers once the big one's time is up.
            small_started = time.monotonic()
            small = await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
                timeout=30,
            )
            small_latency = time.monotonic() - small_started
            resp = await big
            ended = time.monotonic() - started
            assert (
                small.status_code == 200 and small.json()["choices"][0]["finish_reason"] == "length"
            )
            assert small_latency < 2.0, f"the small request took {small_latency:.2f}s"
            assert resp.status_code == 200, resp.text
            choices = resp.json()["choices"]
            assert len(choices) == 256 and {c["finish_reason"] for c in choices} == {"abort"}
            assert 2.0 <= ended < 3.5
            # None of its sequences is left: running, waiting and KV in use back to 0 within a few seconds.
            await stack.assert_idle_without_leaks(timeout=3)

            # Past the deadline while still tokenizing (64 prompts at 50 ms each): a 504 at the deadline,
            # and none of its sequences ever reaches the scheduler.
            stack.tokenizer.delay = 0.05
            prompts_before = stack.core.total_prompt_tokens
            started = time.monotonic()
            slow = await client.post(
                "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": [f"prompt {i}" for i in range(64)],
                    "max_tokens": LONG,
                },
                timeout=30,
            )
            ended = time.monotonic() - started
            error = error_of(slow, 504, "request_timeout")
            assert "--request-timeout" in error["message"] and 2.0 <= ended < 2.8
            stack.tokenizer.delay = 0.0
            await asyncio.sleep(0.5)
            assert stack.core.total_prompt_tokens == prompts_before and not stack.core.requests
            await stack.assert_idle_without_leaks()

    run(main())


def test_request_timeout_on_the_grpc_api(tmp_path):
    async def main():
        async with generation_stack(tmp_path, request_timeout=2, max_running_requests=4) as stack:
            async with grpc.aio.insecure_channel(stack.grpc_addr) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)

                async def generate(ids: list[int], max_new: int) -> tuple[list, float]:
                    started = time.monotonic()
                    msgs = [
                        m
                        async for m in stub.Generate(
                            gateway_pb2.GatewayGenerateRequest(
                                input_ids=common_pb2.TokenIds(ids=ids),
                                stopping=common_pb2.StoppingCriteria(
                                    max_new_tokens=max_new, ignore_eos=True
                                ),
                            )
                        )
                    ]
                    return msgs, time.monotonic() - started

                started = time.monotonic()
                # 12 long generations: 4 run, 8 wait.
                long = [
                    asyncio.create_task(generate(encode(f"story {i}"), LONG)) for i in range(12)
                ]
                await stack.wait_for(
                    lambda i: i["running_requests"] == 4 and i["waiting_requests"] == 8
                )
                await asyncio.sleep(max(0.0, started + 1.0 - time.monotonic()))
                small, small_latency = await generate(encode("hi"), 2)
                assert small[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
                assert small_latency < 2.0, f"the small request took {small_latency:.2f}s"
                for msgs, seconds in await asyncio.gather(*long):
                    assert msgs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
                    assert 1.9 <= seconds < 3.5 and msgs[-1].usage.completion_tokens < LONG
                await stack.assert_idle_without_leaks(timeout=3)

                # Past the deadline while tokenizing: DEADLINE_EXCEEDED, nothing reaches the scheduler.
                stack.tokenizer.delay = 3.0
                started = time.monotonic()
                try:
                    [
                        m
                        async for m in stub.Generate(
                            gateway_pb2.GatewayGenerateRequest(
                                text="Once upon a time",
                                stopping=common_pb2.StoppingCriteria(max_new_tokens=LONG),
                            )
                        )
                    ]
                    raise AssertionError("the generation was not cut at --request-timeout")
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
                    assert "--request-timeout" in e.details()
                assert 2.0 <= time.monotonic() - started < 2.8
                stack.tokenizer.delay = 0.0
                await stack.assert_idle_without_leaks()

    run(main())


# ---- embeddings ----


class SlowEmbedExecutor(executor_pb2_grpc.ExecutorServicer):
    """An embedding executor taking 0.4 s per Embed call."""

    def __init__(self):
        self.calls = 0

    async def GetModelInfo(self, request, context):
        return executor_pb2.ExecutorModelInfo(
            architecture="FakeEncoder",
            model_path="/models/fake-encoder",
            context_length=512,
            vocab_size=VOCAB,
            dtype="float32",
        )

    async def Embed(self, request, context):
        self.calls += 1
        await asyncio.sleep(0.4)
        return executor_pb2.ExecutorEmbedResponse(
            dimension=2,
            embeddings=[float(x) for s in request.sequences for x in (len(s.ids), s.ids[0])],
        )


def test_the_embedding_queue_takes_a_request_s_inputs_all_or_none():
    class BlockedExecutor:
        def __init__(self):
            self.release = asyncio.Event()

        async def Embed(self, request, timeout=None):
            await self.release.wait()
            return executor_pb2.ExecutorEmbedResponse(
                dimension=1, embeddings=[1.0] * len(request.sequences)
            )

    async def main():
        executor = BlockedExecutor()
        batcher = EmbedBatcher(
            executor, max_batch_tokens=1, max_queued=3
        )  # one input per executor call
        loop = asyncio.create_task(batcher.run())
        running = asyncio.create_task(batcher.embed([[1]]))  # at the executor
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(batcher.embed([[2], [3]]))  # 2 of 3 waiting
        await asyncio.sleep(0.05)
        for inputs, code in (
            ([[4], [5]], grpc.StatusCode.RESOURCE_EXHAUSTED),
            ([[6]] * 4, grpc.StatusCode.INVALID_ARGUMENT),
        ):
            try:
                await batcher.embed(inputs)
                raise AssertionError("queued past --max-queued-requests")
            except EmbedFailed as e:
                assert e.code == code, e.message
        assert [p.ids for p in batcher.queue] == [[2], [3]]
        queued.cancel()  # a caller gone: its inputs no longer count
        await asyncio.sleep(0)
        fits = asyncio.create_task(batcher.embed([[7], [8], [9]]))
        await asyncio.sleep(0.05)
        executor.release.set()
        assert len((await fits).values) == 3 and len((await running).values) == 1
        loop.cancel()

    run(main(), timeout=30)


def test_embeddings_inputs_are_counted_and_cut_at_the_request_timeout(tmp_path):
    async def main():
        backends = FakeBackends()
        executor = SlowEmbedExecutor()
        # --max-prefill-tokens 8: each 5-token input is an executor call of its own.
        flags = dict(
            is_embedding=True,
            request_timeout=2,
            max_request_sequences=12,
            max_queued_requests=10,
            max_prefill_tokens=8,
        )
        scheduler, stop = await scheduler_on_fake_executor(executor, **flags)
        try:
            async with gateway_client(
                backends.tokenizer_addr,
                f"127.0.0.1:{scheduler.port}",
                backends.detokenizer_addr,
                served_model_name=MODEL,
                file_storage_path=str(tmp_path),
                **flags,
            ) as (client, _):
                many = await client.post(
                    "/v1/embeddings", json={"model": MODEL, "input": ["hello"] * 13}
                )
                assert (
                    "--max-request-sequences"
                    in error_of(many, 400, "too_many_sequences")["message"]
                )
                over_queue = await client.post(
                    "/v1/embeddings", json={"model": MODEL, "input": ["hello"] * 11}
                )
                assert (
                    "--max-queued-requests"
                    in error_of(over_queue, 400, "too_many_sequences")["message"]
                )
                assert executor.calls == 0

                # 10 inputs at 0.4 s each: cut at 2 s, and the inputs still queued are dropped.
                started = time.monotonic()
                slow = await client.post(
                    "/v1/embeddings", json={"model": MODEL, "input": ["hello"] * 10}
                )
                ended = time.monotonic() - started
                error_of(slow, 504, "request_timeout")
                assert 2.0 <= ended < 2.8
                calls = executor.calls
                assert calls <= 6
                await asyncio.sleep(1.5)
                assert executor.calls <= calls + 1  # at most the call in flight at the deadline

                ok = await client.post(
                    "/v1/embeddings", json={"model": MODEL, "input": ["hi", "hey"]}
                )
                assert ok.status_code == 200, ok.text
                assert [d["embedding"] for d in ok.json()["data"]] == [[2.0, 104.0], [3.0, 104.0]]
        finally:
            await stop()
            backends.stop()

    run(main())
