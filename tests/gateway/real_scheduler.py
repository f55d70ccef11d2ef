"""The real scheduler stepping a fake executor, behind a gateway over the fake tokenizer and detokenizer
(tests/gateway/fakes.py): a Stack to drive it, and helpers to read or cut streamed requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from radixserve.v1 import executor_pb2_grpc
from radixserve.common.args import ServerArgs
from radixserve.common.grpc_util import aio_server, bind
from radixserve.gateway.server import Gateway
from radixserve.scheduler.core import Scheduler
from tests.fake_executor import FakeExecutorServicer
from radixserve.scheduler.server import start_scheduler
from tests.gateway.fakes import FakeBackends, gateway_client

MODEL = "fake-model"
VOCAB = 128  # token ids are code points for the fake detokenizer: ASCII only (httpx splits lines at \x85)
CONTEXT = 4096
KV_SLOTS = 16384
STEP_DELAY_S = 0.004  # so that 2048 tokens take seconds, never less than a test's cut
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


class PacedFakeExecutor(FakeExecutorServicer):
    async def Step(self, request, context):
        await asyncio.sleep(STEP_DELAY_S)
        return await super().Step(request, context)


@dataclass
class Stack:
    client: httpx.AsyncClient
    core: Scheduler
    gateway: Gateway

    async def server_info(self) -> dict:
        r = await self.client.get("/get_server_info")
        assert r.status_code == 200, r.text
        return r.json()["scheduler"]

    async def wait_for(self, predicate, timeout: float = 10.0) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await self.server_info()
            if predicate(info):
                return info
            assert loop.time() < deadline, f"scheduler never reached the state: {info}"
            await asyncio.sleep(0.02)

    async def assert_idle_without_leaks(self, timeout: float = 5.0) -> None:
        """Within timeout, well before an unaborted 2048-token request could finish by itself."""
        info = await self.wait_for(
            lambda i: (
                i["running_requests"] == 0
                and i["waiting_requests"] == 0
                and i["in_use_tokens"] == 0
            ),
            timeout,
        )
        assert info["free_tokens"] + info["cached_tokens"] == info["max_total_tokens"], info
        assert self.core.check_leak(deep=True) is None
        assert not self.core.requests
        live = getattr(self.gateway.app.state, "live_requests", None)
        assert live is None or not live.groups


async def scheduler_on_fake_executor(
    executor: executor_pb2_grpc.ExecutorServicer | None = None, **flags
):
    """The real scheduler (ServerArgs(**flags)) stepping a fake executor (default: a PacedFakeExecutor), both
    on free ports: (the scheduler, an async function that stops both)."""
    executor = executor or PacedFakeExecutor(
        kv_slots=KV_SLOTS, vocab_size=VOCAB, context_length=CONTEXT
    )
    exec_server = aio_server()
    executor_pb2_grpc.add_ExecutorServicer_to_server(executor, exec_server)
    exec_port = bind(exec_server, "127.0.0.1:0")
    await exec_server.start()
    try:
        scheduler = await start_scheduler(
            ServerArgs(
                scheduler_addr="127.0.0.1:0", executor_addr=f"127.0.0.1:{exec_port}", **flags
            )
        )
    except BaseException:
        await exec_server.stop(None)
        raise

    async def stop():
        await scheduler.stop()
        await exec_server.stop(None)

    return scheduler, stop


@contextlib.asynccontextmanager
async def gateway_stack(tmp_path, **flags):
    backends = FakeBackends()  # its tokenizer and detokenizer; the scheduler is the real one
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
            yield Stack(client, scheduler.runtime.core, gateway)
    finally:
        await stop()
        backends.stop()


def run(coro, timeout: float = 60):
    asyncio.run(asyncio.wait_for(coro, timeout))


def sse_payloads(lines: list[str]) -> list[dict]:
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {")]


async def read_stream(
    client: httpx.AsyncClient,
    path: str,
    body: dict,
    cut_when: Callable[[list[str]], bool] | None = None,
) -> list[str]:
    """The SSE lines of a streamed request; with cut_when, the client closes the connection as soon
    as the lines so far satisfy it (a cut mid-generation, however slow the machine)."""
    lines: list[str] = []
    async with asyncio.timeout(120):
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                lines.append(line)
                if cut_when is not None and cut_when(lines):
                    break
    return lines


async def post_cut(client: httpx.AsyncClient, path: str, body: dict, seconds: float) -> None:
    """A non-streamed request whose client gives up (closes the connection) after seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            plain = {k: v for k, v in body.items() if k != "stream_options"}  # 400 unstreamed
            await client.post(path, json={**plain, "stream": False})
        raise AssertionError(f"{path} finished before it was cut")
