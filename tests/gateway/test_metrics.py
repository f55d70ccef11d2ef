"""Prometheus metrics (--enable-metrics): the gateway's per-request and gRPC-hop metrics against fake backends,
the scheduler's against a real scheduler driven by the fake executor, the Grafana dashboard's metric names."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from radixserve.v1 import executor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from radixserve.common.args import ServerArgs
from radixserve.common.grpc_util import aio_channel, aio_server, bind
from radixserve.scheduler.core import Scheduler
from tests.configs import scheduler_config
from tests.fake_executor import FakeExecutorServicer
from radixserve.scheduler.metrics import SchedulerMetrics
from radixserve.common.sampling import StoppingCriteria
from radixserve.common.step import NewRequest, StepInput
from radixserve.scheduler.request import FinishReason, Request, RequestEvent
from radixserve.scheduler.server import start_scheduler
from tests.gateway.fakes import FAIL_MARKER, POISON, FakeBackends, gateway_client

MODEL = "fake-model"
DASHBOARD = pathlib.Path(__file__).parents[2] / "deploy" / "grafana" / "radixserve-dashboard.json"
STEP_DELAY_S = 0.01


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Sample values keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    """The sum of the samples called name whose labels include these."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture(scope="module")
def backends():
    fakes = FakeBackends()
    yield fakes
    fakes.stop()


@contextlib.asynccontextmanager
async def gateway(tokenizer_addr: str, scheduler_addr: str, detokenizer_addr: str, **overrides):
    """A gateway on free ports and an HTTP client for it."""
    async with gateway_client(
        tokenizer_addr, scheduler_addr, detokenizer_addr, served_model_name=MODEL, **overrides
    ) as (client, _):
        yield client


def fake_gateway(backends: FakeBackends, **overrides):
    return gateway(
        backends.tokenizer_addr, backends.scheduler_addr, backends.detokenizer_addr, **overrides
    )


async def scrape(client: httpx.AsyncClient) -> dict:
    resp = await client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 30))


# ---- the gateway's request metrics, against fake backends ----


def test_each_request_is_recorded_once_and_the_health_probe_not_at_all(backends):
    async def body():
        async with fake_gateway(backends, enable_metrics=True) as client:
            usages = []
            for i in range(3):
                resp = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"hi {i}"}],
                        "max_tokens": 7,
                    },
                )
                usages.append(resp.json()["usage"])
            async with client.stream(
                "POST",
                "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "hello",
                    "max_tokens": 5,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ) as resp:
                frames = [line async for line in resp.aiter_lines() if line.startswith("data: {")]
            usages.append(json.loads(frames[-1][len("data: ") :])["usage"])
            assert (await client.get("/health")).status_code == 200
            m = await scrape(client)

        n = len(usages)
        generated = sum(u["completion_tokens"] for u in usages)
        assert value(m, "radixserve:time_to_first_token_seconds_count", model_name=MODEL) == n
        assert value(m, "radixserve:e2e_request_latency_seconds_count", model_name=MODEL) == n
        assert (
            value(m, "radixserve:generation_tokens_total", model_name=MODEL)
            == generated
            == 3 * 7 + 5
        )
        assert value(m, "radixserve:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
        assert value(m, "radixserve:request_success_total", finish_reason="length") == n
        assert value(m, "radixserve:request_success_total") == n
        assert value(m, "radixserve:request_errors_total") == 0
        # The fake scheduler sends two tokens per message: every token after the first message has an ITL.
        assert value(m, "radixserve:inter_token_latency_seconds_count") == generated - 2 * n
        hops = "radixserve:grpc_client_latency_seconds_count"
        assert value(m, hops, service="tokenizer", method="ApplyChatTemplate") == 3
        assert (
            value(m, hops, service="tokenizer", method="Encode") == 2
        )  # /v1/completions and the probe
        # Streamed tokens are decoded on Detokenizer.DecodeStream: each batch's round trip is observed.
        assert value(m, hops, service="detokenizer", method="DecodeStream") > 0
        assert value(m, hops, service="scheduler", method="GetInfo") >= 1

    run(body())


def test_failed_and_abandoned_requests_are_counted_once(backends):
    async def body():
        async with fake_gateway(backends, enable_metrics=True) as client:
            rejected = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": POISON, "max_tokens": 5}
            )
            assert rejected.status_code == 400
            failed = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": FAIL_MARKER, "max_tokens": 20}
            )
            assert failed.status_code == 503
            async with client.stream(
                "POST",
                "/v1/completions",
                json={"model": MODEL, "prompt": "long", "max_tokens": 200, "stream": True},
            ) as resp:
                await anext(resp.aiter_lines())  # then the client goes away
            for _ in range(100):
                m = await scrape(client)
                if value(m, "radixserve:request_success_total", finish_reason="abort"):
                    break
                await asyncio.sleep(0.05)
        assert value(m, "radixserve:request_errors_total") == 2
        assert value(m, "radixserve:request_success_total", finish_reason="abort") == 1
        assert value(m, "radixserve:request_success_total") == 1
        assert (
            value(m, "radixserve:e2e_request_latency_seconds_count") == 1
        )  # failures have no e2e latency
        assert (
            value(m, "radixserve:time_to_first_token_seconds_count") == 2
        )  # the rejected one had no token

    run(body())


def test_metrics_route_is_404_without_the_flag(backends):
    async def body():
        async with fake_gateway(backends) as client:
            resp = await client.get("/metrics")
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "not_found"

    run(body())


# ---- the scheduler's metrics: a real scheduler on the fake executor ----


class PacedFakeExecutor(FakeExecutorServicer):
    """Steps take STEP_DELAY_S, so long requests stay running while the test looks."""

    async def Step(self, request, context):
        await asyncio.sleep(STEP_DELAY_S)
        return await super().Step(request, context)


@contextlib.asynccontextmanager
async def real_scheduler(**overrides):
    exec_server = aio_server()
    executor_pb2_grpc.add_ExecutorServicer_to_server(
        PacedFakeExecutor(kv_slots=1025, context_length=512), exec_server
    )
    exec_port = bind(exec_server, "127.0.0.1:0")
    await exec_server.start()
    scheduler = await start_scheduler(
        ServerArgs(
            scheduler_addr="127.0.0.1:0",
            executor_addr=f"127.0.0.1:{exec_port}",
            served_model_name=MODEL,
            **overrides,
        )
    )
    try:
        yield f"127.0.0.1:{scheduler.port}"
    finally:
        await scheduler.stop()
        await exec_server.stop(None)


@contextlib.asynccontextmanager
async def real_stack(backends: FakeBackends):
    """Gateway -> real scheduler -> fake executor; the fake tokenizer and detokenizer."""
    async with real_scheduler(enable_metrics=True, max_running_requests=2) as scheduler_addr:
        async with gateway(
            backends.tokenizer_addr, scheduler_addr, backends.detokenizer_addr, enable_metrics=True
        ) as client:
            yield client


async def wait_for(client: httpx.AsyncClient, predicate, what: str) -> dict:
    for _ in range(200):
        m = await scrape(client)
        if predicate(m):
            return m
        await asyncio.sleep(0.05)
    raise AssertionError(f"metrics never showed {what}: {m}")


def load(m: dict) -> tuple[float, float, float]:
    return (
        value(m, "radixserve:num_running_reqs"),
        value(m, "radixserve:num_queue_reqs"),
        value(m, "radixserve:token_usage"),
    )


async def stream_forever(client: httpx.AsyncClient, i: int) -> None:
    async with client.stream(
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": f"long request {i}", "max_tokens": 400, "stream": True},
    ) as resp:
        async for _ in resp.aiter_bytes():
            pass


def test_scheduler_gauges_follow_running_waiting_and_aborted_requests(backends):
    async def body():
        async with real_stack(backends) as client:
            streams = [asyncio.create_task(stream_forever(client, i)) for i in range(4)]
            m = await wait_for(
                client, lambda m: load(m)[:2] == (2, 2), "2 running and 2 waiting requests"
            )
            assert 0 < load(m)[2] < 1
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            m = await wait_for(client, lambda m: load(m) == (0, 0, 0), "an idle scheduler")
            assert value(m, "radixserve:queue_time_seconds_count", model_name=MODEL) >= 2
            assert (
                value(m, "radixserve:executor_step_latency_seconds_count", forward_mode="prefill")
                > 0
            )
            assert (
                value(m, "radixserve:executor_step_latency_seconds_count", forward_mode="decode")
                > 0
            )
            assert value(m, "radixserve:scheduler_prompt_tokens_total") > 0
            m = await wait_for(
                client,
                lambda m: value(m, "radixserve:request_success_total") == 4,
                "the 4 abandoned requests",
            )
            assert value(m, "radixserve:request_success_total", finish_reason="abort") == 4

    run(body())


def test_every_metric_of_the_grafana_dashboard_is_served(backends):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set(re.findall(r"radixserve:[A-Za-z0-9_:]+", DASHBOARD.read_text()))
    assert len(exprs) >= 12 and len(used) >= 15

    async def body():
        async with real_stack(backends) as client:
            resp = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}
            )
            assert resp.status_code == 200
            text = (await client.get("/metrics")).text
            families = re.findall(r"^# TYPE (\S+)", text, flags=re.MULTILINE)
            assert len(families) == len(
                set(families)
            )  # the gateway's and the scheduler's names differ
            return {name for name, _ in parse(text)}

    served = asyncio.run(asyncio.wait_for(body(), 30))
    assert used - served == set()


def test_scheduler_get_metrics_is_empty_without_the_flag():
    async def body():
        async with real_scheduler() as scheduler_addr:
            channel = aio_channel(scheduler_addr)
            try:
                resp = await scheduler_pb2_grpc.SchedulerStub(channel).GetMetrics(
                    scheduler_pb2.SchedulerMetricsRequest()
                )
            finally:
                await channel.close()
        assert resp.prometheus_text == ""

    run(body())


def test_queue_time_is_observed_at_the_first_admission_only():
    metrics = SchedulerMetrics(
        Scheduler(scheduler_config(max_running_requests=4), pool_size=64, context_length=32), MODEL
    )
    for rid in ("admitted", "aborted while waiting"):
        metrics.submitted(
            Request(rid, [1, 2, 3], StoppingCriteria(4), arrival_time=time.monotonic() - 0.5)
        )

    def admit(rid: str) -> StepInput:
        return StepInput(step_id=1, new_requests=[NewRequest(rid, [1, 2, 3], [1, 2, 3])])

    metrics.sent(admit("admitted"))
    metrics.sent(admit("admitted"))  # re-admitted after a retraction
    metrics.dispatched([RequestEvent("aborted while waiting", finish_reason=FinishReason.ABORT)])
    metrics.sent(
        admit("aborted while waiting")
    )  # only a new request of the same id could be admitted now
    m = parse(metrics.prometheus_text())
    assert value(m, "radixserve:queue_time_seconds_count") == 1
    assert value(m, "radixserve:queue_time_seconds_sum") >= 0.5
