"""OpenTelemetry tracing shared by the five services (--otlp-traces-endpoint, --trace-sample-ratio).

One request is one trace. Where a gRPC call serves one request (tokenize, a unary call made inside a
traced request) the W3C traceparent travels in the call's metadata through the interceptors below.
Where one message serves many requests (the scheduler Session stream, executor steps, batched
detokenizer calls) each request's context travels in a `TraceContext` field of its own item.

With tracing off (the default) `setup` installs nothing, `enabled()` is False and callers skip their
span work: the hot path has no exporter, interceptor or context handling at all. The OpenTelemetry
SDK is imported only when tracing is on; a missing package stops the service at start.
"""

from __future__ import annotations

import logging
from typing import Any

from radixserve.v1 import common_pb2

log = logging.getLogger("radixserve.tracing")

INSTALL_HINT = (
    "tracing needs the OpenTelemetry SDK and OTLP exporter: pip install 'radixserve[tracing]'"
)
EXPORT_DELAY_MS = 500
# A step span links every traced request it served; a request span is never linked from more.
MAX_LINKS_PER_SPAN = 1024


class _State:
    tracer: Any = None
    provider: Any = None
    service_name: str = ""


_state = _State()


def enabled() -> bool:
    return _state.tracer is not None


def tracer():
    """The service's tracer; only call when enabled()."""
    return _state.tracer


def setup(service: str, endpoint: str | None, sample_ratio: float = 1.0, exporter=None) -> bool:
    """Start tracing for this process as radixserve-<service>; False (and nothing done) without an
    endpoint. `exporter` replaces the OTLP exporter (tests). Raises SystemExit if packages are missing."""
    if not endpoint and exporter is None:
        return False
    if not 0.0 <= sample_ratio <= 1.0:
        raise SystemExit(f"--trace-sample-ratio must be in [0, 1], got {sample_ratio}")
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise SystemExit(f"error: {INSTALL_HINT} ({e})") from None
    from radixserve.common import grpc_util
    from radixserve.common.trace_propagation import (
        ClientTracingInterceptor,
        ServerTracingInterceptor,
        sampler,
    )

    if exporter is None:
        url = endpoint if "://" in endpoint else f"http://{endpoint}"
        exporter = OTLPSpanExporter(endpoint=url, insecure=url.startswith("http://"))
    _state.service_name = f"radixserve-{service}"
    provider = TracerProvider(
        resource=Resource.create({"service.name": _state.service_name}),
        sampler=sampler(sample_ratio),
        span_limits=SpanLimits(max_links=MAX_LINKS_PER_SPAN),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
    trace.set_tracer_provider(provider)
    _state.provider = provider
    _state.tracer = provider.get_tracer("radixserve")
    grpc_util.install(
        client_interceptors=[ClientTracingInterceptor()],
        server_interceptors=[ServerTracingInterceptor()],
    )
    log.info(
        "tracing to %s as %s (sample ratio %g)",
        endpoint or "a test exporter",
        _state.service_name,
        sample_ratio,
    )
    return True


def shutdown() -> None:
    """Export what is buffered and stop (called when the service stops)."""
    if _state.provider is not None:
        _state.provider.shutdown()
    _state.tracer = _state.provider = None


# ---- contexts inside messages ----


def context_from_proto(tc: common_pb2.TraceContext | None):
    """The OpenTelemetry Context of a TraceContext field, or None when it is unset or invalid."""
    if tc is None or not tc.traceparent:
        return None
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": tc.traceparent}
    if tc.tracestate:
        carrier["tracestate"] = tc.tracestate
    ctx = TraceContextTextMapPropagator().extract(carrier)
    return ctx if get_current_span(ctx).get_span_context().is_valid else None


def span_to_proto(span) -> common_pb2.TraceContext | None:
    """span's context as a TraceContext field; None when the span is not sampled."""
    span_context = span.get_span_context()
    if not span_context.is_valid or not span_context.trace_flags.sampled:
        return None
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return common_pb2.TraceContext(
        traceparent=carrier.get("traceparent", ""), tracestate=carrier.get("tracestate", "")
    )


def current_trace_id() -> str:
    """The hex trace id of the current span, or "" (for log lines)."""
    if not enabled():
        return ""
    from opentelemetry.trace import get_current_span

    span_context = get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


def trace_id_of(span) -> str:
    span_context = span.get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
