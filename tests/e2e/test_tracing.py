"""OpenTelemetry traces across the five service processes, collected by a real OTLP/gRPC receiver."""

from __future__ import annotations

import secrets
import sys

import httpx
import pytest

from radixserve.common import grpc_util, tracing
from tests.otlp_receiver import start_receiver
from tests.stack import running_stack

SERVICES = {
    "radixserve-gateway",
    "radixserve-tokenizer",
    "radixserve-scheduler",
    "radixserve-executor",
    "radixserve-detokenizer",
}


@pytest.fixture(scope="module")
def receiver():
    r = start_receiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def stack(receiver, tmp_path_factory):
    with running_stack(
        tmp_path_factory.mktemp("tracing"),
        "--otlp-traces-endpoint",
        receiver.endpoint,
        "--trace-sample-ratio",
        "1.0",
        "--log-requests",
    ) as s:
        yield s


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def _chat(stack, traceparent: str, stream: bool = False) -> dict | list[str]:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 3,
        "max_tokens": 12,
        "messages": [{"role": "user", "content": "Name three colors."}],
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    with httpx.Client(timeout=120) as client:
        r = client.post(
            stack.base_url + "/v1/chat/completions", json=body, headers={"traceparent": traceparent}
        )
        r.raise_for_status()
        return (
            r.json()
            if not stream
            else [line for line in r.text.splitlines() if line.startswith("data: ")]
        )


def _complete_trace(trace_id: str):
    def done(spans) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        names = {s.name for s in mine}
        return (
            {s.service for s in mine} >= SERVICES
            and "POST /v1/chat/completions" in names
            and {"decode", "scheduler.request", "generate"} <= names
            and sum(s.name == "detokenize" for s in mine) >= 2
        )

    return done


@pytest.mark.e2e
def test_one_request_is_one_trace_across_all_five_services(stack, receiver):
    traceparent, trace_id, remote_parent = _traceparent()
    response = _chat(stack, traceparent)
    spans = [s for s in receiver.wait_for(_complete_trace(trace_id)) if s.trace_id == trace_id]
    assert {s.service for s in spans} == SERVICES, sorted({(s.service, s.name) for s in spans})

    by_id = {s.span_id: s for s in spans}
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)

    def only(name: str):
        assert len(by_name.get(name, [])) == 1, (name, [(s.service, s.name) for s in spans])
        return by_name[name][0]

    def parent(span):
        return by_id[span.parent_span_id]

    def under_http(span) -> bool:
        """A descendant of the HTTP span (through FastAPI's own operation spans, e.g. fastapi.endpoint)."""
        while span.parent_span_id in by_id:
            span = parent(span)
            if span is http:
                return True
            assert span.name.startswith("fastapi."), span.name
        return False

    # Every parent is in the trace, except the root's, which is the caller's traceparent.
    http = only("POST /v1/chat/completions")
    assert http.service == "radixserve-gateway" and http.parent_span_id == remote_parent
    assert all(s.parent_span_id in by_id for s in spans if s is not http)
    assert http.attributes["http.response.status_code"] == 200

    # tokenize: the gateway's client span -> the tokenizer's server span
    # (the first request of a gateway also fetches the model's facts: GetInfo spans)
    tokenizer_server = [
        s
        for s in spans
        if s.service == "radixserve-tokenizer"
        and s.name == "radixserve.v1.Tokenizer/ApplyChatTemplate"
    ]
    assert len(tokenizer_server) == 1
    tokenize_client = parent(tokenizer_server[0])
    assert tokenize_client.service == "radixserve-gateway" and under_http(tokenize_client)

    generate = only("generate")
    assert under_http(generate)
    request_id = generate.attributes["radixserve.request_id"]
    usage = response["usage"]
    assert generate.attributes["gen_ai.request.model"] == "SmolLM2-135M-Instruct"
    assert generate.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert generate.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert (
        generate.attributes["radixserve.cached_tokens"]
        == usage["prompt_tokens_details"]["cached_tokens"]
    )
    assert generate.attributes["gen_ai.response.finish_reasons"] == [
        response["choices"][0]["finish_reason"]
    ]
    assert generate.attributes["gen_ai.request.temperature"] == pytest.approx(0.5)
    assert generate.attributes["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert generate.attributes["gen_ai.request.seed"] == 3
    assert generate.attributes["gen_ai.request.max_tokens"] == 12
    assert generate.attributes["radixserve.ttft_ms"] > 0 and "first_token" in generate.events

    scheduler = only("scheduler.request")
    assert scheduler.service == "radixserve-scheduler" and parent(scheduler) is generate
    assert scheduler.attributes["radixserve.request_id"] == request_id
    assert scheduler.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert (
        scheduler.attributes["radixserve.queue_ms"] >= 0
        and scheduler.attributes["radixserve.ttft_ms"] > 0
    )
    phases = {name: only(name) for name in ("queue", "prefill", "decode")}
    assert all(
        parent(p) is scheduler and p.service == "radixserve-scheduler" for p in phases.values()
    )
    assert (
        phases["queue"].end_ns
        <= phases["prefill"].start_ns
        <= phases["prefill"].end_ns
        <= phases["decode"].start_ns
    )
    assert "chunk" in phases["prefill"].events
    assert phases["decode"].attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]

    prefill = only("executor.prefill")
    assert prefill.service == "radixserve-executor" and parent(prefill) is scheduler
    assert prefill.attributes["radixserve.tokens"] == usage["prompt_tokens"]

    detokenize = by_name["detokenize"]
    assert all(d.service == "radixserve-detokenizer" and parent(d) is generate for d in detokenize)
    finals = [
        d.attributes["radixserve.final"] for d in sorted(detokenize, key=lambda d: d.start_ns)
    ]
    # Only the last call flushes; when the request ended on its stop token with no text held back,
    # there is none (that token's text is never shown, so nothing is left to decode).
    assert True not in finals[:-1]
    assert finals[-1] is True or response["choices"][0]["finish_reason"] == "stop"

    # Each executor step that served the request is a span of its own trace, linked to the request.
    steps = receiver.wait_for(
        lambda all_spans: (
            sum(
                (trace_id, scheduler.span_id) in s.links
                for s in all_spans
                if s.name == "executor.step"
            )
            >= usage["completion_tokens"]
        )
    )
    served = [
        s for s in steps if s.name == "executor.step" and (trace_id, scheduler.span_id) in s.links
    ]
    assert (
        len(served) >= usage["completion_tokens"]
    )  # one prefill step + a decode step per later token
    assert all(
        s.service == "radixserve-executor" and s.attributes["radixserve.batch_size"] >= 1
        for s in served
    )
    assert [span_id for _, span_id in prefill.links] in [[s.span_id] for s in served]


@pytest.mark.e2e
def test_streamed_request_is_traced_and_logged_with_its_ids(stack, receiver):
    traceparent, trace_id, _ = _traceparent()
    lines = _chat(stack, traceparent, stream=True)
    assert lines[-1] == "data: [DONE]"
    spans = [s for s in receiver.wait_for(_complete_trace(trace_id)) if s.trace_id == trace_id]
    generate = next(s for s in spans if s.name == "generate")
    assert generate.attributes["gen_ai.response.finish_reasons"] in (["stop"], ["length"])
    http = next(s for s in spans if s.name == "POST /v1/chat/completions")
    assert http.end_ns >= generate.end_ns  # the HTTP span lasts until the stream's last byte
    log = stack.log_tail(400)
    request_id = generate.attributes["radixserve.request_id"]
    assert any(
        request_id in line and trace_id in line and "finished" in line for line in log.splitlines()
    ), log


@pytest.mark.e2e
def test_unsampled_traceparent_is_honoured(stack, receiver):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    _chat(stack, f"00-{trace_id}-{parent_id}-00")
    sampled_trace, sampled_id, _ = _traceparent()
    _chat(stack, sampled_trace)  # traced after the unsampled one: its spans prove the export ran
    spans = receiver.wait_for(_complete_trace(sampled_id))
    assert not [s for s in spans if s.trace_id == trace_id]


def test_tracing_off_installs_nothing():
    grpc_util.reset()
    assert tracing.setup("gateway", None) is False
    assert not tracing.enabled()
    assert (
        grpc_util.settings.client_interceptors == []
        and grpc_util.settings.server_interceptors == []
    )


def test_missing_opentelemetry_is_a_clear_error_at_start(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(SystemExit, match=r"pip install 'radixserve\[tracing\]'"):
        tracing.setup("scheduler", "127.0.0.1:4317")
    assert not tracing.enabled()
