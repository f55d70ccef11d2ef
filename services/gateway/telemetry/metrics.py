"""The gateway's Prometheus metrics (--enable-metrics): request latencies and token counts recorded per
request by Engine.stream, and the latency of each gRPC hop to the backend services."""

from __future__ import annotations

import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

# Seconds; LLM serving spans millisecond decode steps to generations of minutes.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
ITL_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
E2E_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    2400.0,
)
GRPC_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
FINISH_REASONS = ("stop", "length", "abort")


class GatewayMetrics:
    """The gateway's registry (one per Engine, so several gateways can live in one process)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels, r = ["model_name"], self.registry
        self.ttft = Histogram(
            "radixserve:time_to_first_token_seconds",
            "Time from sending the tokenized "
            "request to the scheduler to its first tokens, detokenized",
            labels,
            registry=r,
            buckets=TTFT_BUCKETS,
        ).labels(model_name)
        self.itl = Histogram(
            "radixserve:inter_token_latency_seconds",
            "Time between tokens after the first (a message's gap split over its tokens)",
            labels,
            registry=r,
            buckets=ITL_BUCKETS,
        ).labels(model_name)
        self.e2e = Histogram(
            "radixserve:e2e_request_latency_seconds",
            "Duration of requests that finished "
            "(stop, length or abort); failed ones are not included",
            labels,
            registry=r,
            buckets=E2E_BUCKETS,
        ).labels(model_name)
        self.prompt_tokens = Counter(
            "radixserve:prompt_tokens_total", "Prompt tokens of ended requests", labels, registry=r
        ).labels(model_name)
        self.generation_tokens = Counter(
            "radixserve:generation_tokens_total", "Tokens generated", labels, registry=r
        ).labels(model_name)
        success = Counter(
            "radixserve:request_success_total",
            "Requests that finished, by finish reason "
            "(abort: aborted by the scheduler or the client went away)",
            [*labels, "finish_reason"],
            registry=r,
        )
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.errors = Counter(
            "radixserve:request_errors_total", "Requests that ended in an error", labels, registry=r
        ).labels(model_name)
        self.grpc_latency = Histogram(
            "radixserve:grpc_client_latency_seconds",
            "Round trip of the gateway's gRPC calls to the backend services (unary, or a request and its "
            "answer on a stream)",
            ["service", "method"],
            registry=r,
            buckets=GRPC_BUCKETS,
        )

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def later_tokens(self, gap_s: float, n: int) -> None:
        """n tokens arrived gap_s after the previous ones: one inter-token latency each."""
        for _ in range(n):
            self.itl.observe(gap_s / n)

    def ended(self, prompt_tokens: int, generated: int, reason: str | None, e2e_s: float) -> None:
        """A request ended: finished with reason (stop, length, abort), or failed (reason None)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        if reason is None:
            self.errors.inc()
        else:
            self.e2e.observe(e2e_s)
            self.success[reason].inc()

    def client_interceptors(self, service: str) -> list[grpc.aio.ClientInterceptor]:
        return [HopLatencyInterceptor(self.grpc_latency, service)]

    def exchange_observer(self, service: str):
        """observe(method, seconds) for the exchanges on a service's streams (ReplicaSet.exchange): the
        same histogram as a unary call's round trip, under the stream method's name."""
        return lambda method, seconds: self.grpc_latency.labels(service, method).observe(seconds)

    def prometheus_text(self) -> str:
        return generate_latest(self.registry).decode()


def client_interceptors(
    metrics: GatewayMetrics | None, service: str
) -> list[grpc.aio.ClientInterceptor]:
    return metrics.client_interceptors(service) if metrics is not None else []


class HopLatencyInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Observes each unary call's round trip, labelled with the service and the method name."""

    def __init__(self, histogram: Histogram, service: str):
        self._histogram = histogram
        self._service = service

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        method = client_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        observe = self._histogram.labels(self._service, method.rsplit("/", 1)[-1]).observe
        start = time.perf_counter()
        call = await continuation(client_call_details, request)
        call.add_done_callback(lambda _call: observe(time.perf_counter() - start))
        return call
