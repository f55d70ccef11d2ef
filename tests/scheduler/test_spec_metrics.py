"""Speculative decoding's acceptance figures where users read them: the scheduler's /metrics families,
its decode log line, and `bench serving`'s accept length (from /get_server_info's counters)."""

from __future__ import annotations

from radixserve.bench.serving import RequestResult, accept_length, compute_metrics, format_table
from radixserve.common.step import StepInput
from radixserve.scheduler.core import Scheduler
from radixserve.scheduler.decode_log import DecodeLog
from radixserve.scheduler.metrics import SchedulerMetrics
from radixserve.scheduler.request import RequestEvent
from tests.configs import scheduler_config


def core(**config) -> Scheduler:
    return Scheduler(scheduler_config(max_running_requests=4, **config), 64, 128)


def test_metrics_report_the_counters_and_the_average_accepted_length():
    sched = core(speculative_algorithm="NGRAM")
    text = SchedulerMetrics(sched, "m").prometheus_text()
    assert 'radixserve:spec_accept_length{model_name="m"} 0.0' in text
    sched.spec_stats.add(drafted=4, accepted=3)
    sched.spec_stats.add(drafted=4, accepted=0)
    text = SchedulerMetrics(sched, "m").prometheus_text()
    assert 'radixserve:spec_accept_length{model_name="m"} 2.5' in text
    assert 'radixserve:spec_verify_steps_total{model_name="m"} 2.0' in text
    assert 'radixserve:spec_draft_tokens_total{model_name="m"} 8.0' in text
    assert 'radixserve:spec_accepted_tokens_total{model_name="m"} 3.0' in text


def test_decode_log_line_every_interval_with_the_window_accept_length(caplog):
    sched = core(speculative_algorithm="NGRAM")
    now = [0.0]
    sched.spec_stats.add(drafted=8, accepted=8)  # before the window: not counted
    observer = DecodeLog(sched, interval=2, clock=lambda: now[0])
    decode = StepInput(1)
    caplog.set_level("INFO", logger="radixserve.scheduler.decode")
    for accepted in (2, 5):
        sched.spec_stats.add(drafted=6, accepted=accepted)
        observer.dispatched([RequestEvent("r", token_ids=[1] * (accepted + 1))])
        now[0] += 0.5
        observer.completed(decode, 0.5)
    (line,) = [r.getMessage() for r in caplog.records]
    # 2 + 1 and 5 + 1 tokens in 1 s; (2 + 5) / 2 accepted per verify step, plus the target's token.
    assert "2 steps" in line and "gen throughput 9.0 tok/s" in line
    assert "accept len 4.50 (2 verify steps)" in line
    assert "accept len" not in DecodeLog(core(), interval=1).line()


def test_bench_serving_reports_the_accept_length_of_the_run():
    assert accept_length((10, 30), (14, 36)) == 2.5
    assert accept_length((3, 3), (3, 3)) is None
    summary = {
        **compute_metrics([RequestResult(10, True, 4, ttft=0.1, itl=[0.1] * 3, e2e=0.4)], 1.0),
        "backend": "radixserve",
        "request_rate": "inf",
        "max_concurrency": 1,
    }
    assert "Accept length" not in format_table({**summary, "accept_length": None})
    assert "Accept length:                           2.50" in format_table(
        {**summary, "accept_length": 2.5}
    )
