"""The scheduler's Prometheus metrics (--enable-metrics), served through the GetMetrics RPC: queue time and
executor step latency observed on the step loop, and load figures read from the core at scrape time."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from radixserve.common.args import ServerArgs
from radixserve.gateway.pipeline.engine import served_model_name
from radixserve.scheduler.core import Scheduler
from radixserve.common.step import StepInput
from radixserve.scheduler.request import Request, RequestEvent
from radixserve.scheduler.runtime import RuntimeObserver, SchedulerRuntime

QUEUE_TIME_BUCKETS = (
    0.001,
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
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
)
STEP_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.006,
    0.008,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class SchedulerMetrics(RuntimeObserver):
    def __init__(self, core: Scheduler, model_name: str):
        self.registry = CollectorRegistry()
        self.queue_time = Histogram(
            "radixserve:queue_time_seconds",
            "Time from a request's arrival at the scheduler to its first admission into a step",
            ["model_name"],
            registry=self.registry,
            buckets=QUEUE_TIME_BUCKETS,
        ).labels(model_name)
        self.step_latency = Histogram(
            "radixserve:executor_step_latency_seconds",
            "Round trip of a step from the scheduler to the executor and back",
            ["model_name", "forward_mode"],
            registry=self.registry,
            buckets=STEP_LATENCY_BUCKETS,
        )
        self.model_name = model_name
        self.registry.register(SchedulerStatsCollector(core, model_name))
        self._arrival_times: dict[str, float] = {}  # of requests not yet admitted

    def submitted(self, req: Request) -> None:
        self._arrival_times[req.request_id] = req.arrival_time

    def sent(self, plan: StepInput) -> None:
        now = time.monotonic()
        for new in plan.new_requests:
            # A request re-admitted after a retraction is no longer here: its queue time counts once.
            arrival = self._arrival_times.pop(new.request_id, None)
            if arrival is not None:
                self.queue_time.observe(now - arrival)

    def completed(self, plan: StepInput, seconds: float) -> None:
        mode = "prefill" if plan.is_prefill else "decode"
        self.step_latency.labels(self.model_name, mode).observe(seconds)

    def dispatched(self, events: list[RequestEvent]) -> None:
        for event in events:
            if event.finished:
                self._arrival_times.pop(event.request_id, None)

    def failed(self, request_ids: list[str], message: str) -> None:
        for rid in request_ids:
            self._arrival_times.pop(rid, None)

    def prometheus_text(self) -> str:
        return generate_latest(self.registry).decode()


class SchedulerStatsCollector(Collector):
    """Gauges and counters of core.stats(), read when scraped."""

    def __init__(self, core: Scheduler, model_name: str):
        self.core = core
        self.model_name = model_name

    def collect(self):
        stats = self.core.stats()
        labels = [self.model_name]
        gauges = [
            ("radixserve:num_running_reqs", "Requests in the running batch", stats.running),
            ("radixserve:num_queue_reqs", "Requests waiting to be admitted", stats.waiting),
            ("radixserve:num_used_tokens", "KV slots held by running requests", stats.in_use),
            (
                "radixserve:num_cached_tokens",
                "KV slots held only by the prefix cache (evictable)",
                stats.cached,
            ),
            ("radixserve:max_total_num_tokens", "KV slots in the pool", stats.pool_tokens),
            (
                "radixserve:token_usage",
                "Fraction of the KV pool held by running requests",
                stats.in_use / stats.pool_tokens if stats.pool_tokens else 0.0,
            ),
            (
                "radixserve:spec_accept_length",
                "Speculative decoding: average tokens a verify step emits per request (accepted "
                "drafts + 1), since start; 0 without speculation",
                1 + stats.spec_accepted_tokens / stats.spec_verify_steps
                if stats.spec_verify_steps
                else 0.0,
            ),
            (
                "radixserve:cache_hit_rate",
                "Prompt tokens served from the prefix cache / prompt tokens, since start",
                stats.total_cached_prompt_tokens / stats.total_prompt_tokens
                if stats.total_prompt_tokens
                else 0.0,
            ),
        ]
        for name, documentation, value in gauges:
            family = GaugeMetricFamily(name, documentation, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        counters = [
            (
                "radixserve:scheduler_prompt_tokens",
                "Prompt tokens received by the scheduler",
                stats.total_prompt_tokens,
            ),
            (
                "radixserve:cached_prompt_tokens",
                "Prompt tokens served from the prefix cache",
                stats.total_cached_prompt_tokens,
            ),
            (
                "radixserve:spec_verify_steps",
                "Speculative decoding: verify steps, one per request and step that carried drafts",
                stats.spec_verify_steps,
            ),
            (
                "radixserve:spec_draft_tokens",
                "Speculative decoding: draft tokens proposed",
                stats.spec_draft_tokens,
            ),
            (
                "radixserve:spec_accepted_tokens",
                "Speculative decoding: draft tokens accepted",
                stats.spec_accepted_tokens,
            ),
            (
                "radixserve:retracted_requests",
                "Requests retracted to free KV for running ones",
                stats.num_retractions,
            ),
        ]
        for name, documentation, value in counters:
            family = CounterMetricFamily(name, documentation, labels=["model_name"])
            family.add_metric(labels, value)
            yield family


def attach_metrics(runtime: SchedulerRuntime, args: ServerArgs) -> SchedulerMetrics | None:
    """With --enable-metrics: a SchedulerMetrics observing runtime; else None."""
    if not args.enable_metrics:
        return None
    metrics = SchedulerMetrics(runtime.core, served_model_name(args))
    runtime.observers.append(metrics)
    return metrics
