"""W3C trace context across gRPC hops (imported only with tracing on; needs the OpenTelemetry SDK).

The client interceptor opens a CLIENT span and sends its traceparent in the call's metadata only for
calls made inside a traced request: calls from background loops (the scheduler's steps, the
gateway's coalesced detokenizer batches, the Session stream) pass through untouched, so they do
not start a trace of their own every few milliseconds. The server interceptor opens a SERVER span
for a unary call that arrives with a traceparent, and does nothing for one without.
"""

from __future__ import annotations

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from radixserve.common import tracing

_propagator = TraceContextTextMapPropagator()
_TRACE_HEADERS = ("traceparent", "tracestate")


class _LinkedOrRatio(Sampler):
    """For root spans: sampled when a link points at a sampled span (an executor step that served a
    traced request), else by trace-id ratio."""

    def __init__(self, ratio: float):
        self._ratio = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context,
        trace_id,
        name,
        kind=None,
        attributes=None,
        links=None,
        trace_state=None,
    ) -> SamplingResult:
        if links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._ratio.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"LinkedOrRatio{{{self._ratio.get_description()}}}"


def sampler(ratio: float) -> Sampler:
    """Incoming sampled parents are honoured; new roots sampled at ratio (or when linked to a sampled span)."""
    return ParentBased(root=_LinkedOrRatio(ratio))


def _split_method(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _rpc_attributes(method: str) -> dict:
    service, name = _split_method(method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _with_trace_metadata(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in carrier.items():
        metadata.add(key, value)
    return details._replace(metadata=metadata)


def _in_traced_request() -> bool:
    return trace.get_current_span().get_span_context().trace_flags.sampled


class ClientTracingInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor
):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        if not _in_traced_request():
            return await continuation(client_call_details, request)
        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        with tracing.tracer().start_as_current_span(
            method.lstrip("/"), kind=SpanKind.CLIENT, attributes=_rpc_attributes(method)
        ) as span:
            call = await continuation(_with_trace_metadata(client_call_details), request)
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
            return call

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        if not _in_traced_request():
            return await continuation(client_call_details, request)
        return await continuation(_with_trace_metadata(client_call_details), request)


def context_from_metadata(metadata):
    """The parent context carried in gRPC invocation metadata, or None."""
    carrier = {key: value for key, value in (metadata or ()) if key in _TRACE_HEADERS}
    if "traceparent" not in carrier:
        return None
    ctx = _propagator.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


class ServerTracingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        parent = context_from_metadata(handler_call_details.invocation_metadata)
        if handler is None or parent is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        inner = handler.unary_unary

        async def traced(request, context):
            token = otel_context.attach(parent)
            try:
                with tracing.tracer().start_as_current_span(
                    method.lstrip("/"), kind=SpanKind.SERVER, attributes=_rpc_attributes(method)
                ):
                    return await inner(request, context)
            finally:
                otel_context.detach(token)

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
