"""The gateway's span of one generation: from handing the request to the scheduler to its finish.

Its context travels to the scheduler in the generate action (and from there to the executor), and
to the detokenizer on the first and the final decode item. Token arrivals are counted on the span
(TTFT as an attribute and a `first_token` event), not recorded one span per token. With tracing off
`RequestTrace.start` returns NO_TRACE, whose methods do nothing; so it does outside a traced HTTP or
gRPC request.
"""

from __future__ import annotations

import contextlib

from radixserve.v1 import common_pb2
from radixserve.common import tracing
from radixserve.common.sampling import SamplingParams, StoppingCriteria


UNTRACED_PATHS = frozenset({"/health", "/health_generate", "/metrics"})


def untraced_http_request(scope) -> bool:
    """Probes and scrapes start no trace of their own (unless the caller sends a traceparent)."""
    return scope.get("path") in UNTRACED_PATHS and not any(
        key == b"traceparent" for key, _ in scope["headers"]
    )


class _NoTrace:
    trace_context = None

    def decode_context(self, final: bool):
        return None

    def first_token(self, ttft_s: float) -> None:
        pass

    def decoded(self, seconds: float) -> None:
        pass

    def finish(
        self, reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int
    ) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass


NO_TRACE = _NoTrace()


def _sampling_attributes(sampling: SamplingParams, stopping: StoppingCriteria) -> dict:
    attrs = {
        "gen_ai.request.temperature": sampling.temperature,
        "gen_ai.request.top_p": sampling.top_p,
        "gen_ai.request.max_tokens": stopping.max_new_tokens,
        "gen_ai.request.top_k": sampling.top_k,
    }
    if sampling.seed is not None:
        attrs["gen_ai.request.seed"] = sampling.seed
    for name in ("frequency_penalty", "presence_penalty", "repetition_penalty", "min_p"):
        value = getattr(sampling, name)
        if value:
            attrs[f"radixserve.sampling.{name}"] = value
    if stopping.min_new_tokens:
        attrs["radixserve.sampling.min_new_tokens"] = stopping.min_new_tokens
    if sampling.constraint is not None:
        attrs["radixserve.sampling.constraint"] = sampling.constraint.kind
    return attrs


class RequestTrace:
    """A live `generate` span; see the module docstring. RequestTelemetry calls finish or fail once."""

    @staticmethod
    def start(
        request_id: str,
        model: str,
        prompt_tokens: int,
        sampling: SamplingParams,
        stopping: StoppingCriteria,
    ):
        if not tracing.enabled():
            return NO_TRACE
        from opentelemetry import trace

        if not trace.get_current_span().get_span_context().trace_flags.sampled:
            return NO_TRACE  # outside a traced HTTP or gRPC request (health probes, batch jobs)
        return RequestTrace(
            tracing.tracer().start_span(
                "generate",
                attributes={
                    "radixserve.request_id": request_id,
                    "gen_ai.request.model": model,
                    "gen_ai.usage.input_tokens": prompt_tokens,
                    **_sampling_attributes(sampling, stopping),
                },
            )
        )

    def __init__(self, span):
        self.span = span
        self.trace_context = tracing.span_to_proto(span)
        self.decode_calls = 0
        self.decode_seconds = 0.0
        self.first_decode_sent = False

    def decode_context(self, final: bool) -> common_pb2.TraceContext | None:
        """The context for a detokenizer item: only on the first and the final one."""
        if final or not self.first_decode_sent:
            self.first_decode_sent = True
            return self.trace_context
        return None

    def first_token(self, ttft_s: float) -> None:
        self.span.set_attribute("radixserve.ttft_ms", round(ttft_s * 1000, 3))
        self.span.add_event("first_token")

    def decoded(self, seconds: float) -> None:
        self.decode_calls += 1
        self.decode_seconds += seconds

    def finish(
        self, reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int
    ) -> None:
        self.span.set_attributes(
            {
                "gen_ai.response.finish_reasons": [reason],
                "gen_ai.usage.input_tokens": prompt_tokens,
                "gen_ai.usage.output_tokens": completion_tokens,
                "radixserve.cached_tokens": cached_tokens,
                "radixserve.detokenize.calls": self.decode_calls,
                "radixserve.detokenize.ms": round(self.decode_seconds * 1000, 3),
            }
        )
        self.span.end()

    def fail(self, error: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.record_exception(error)
        self.span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        self.span.end()


@contextlib.contextmanager
def grpc_entry_span(method: str, invocation_metadata):
    """The root span of a public gRPC API call (the HTTP middleware's counterpart): an incoming
    traceparent in the metadata is honoured. Does nothing with tracing off."""
    if not tracing.enabled():
        yield
        return
    from opentelemetry.trace import SpanKind
    from radixserve.common.trace_propagation import context_from_metadata

    service, _, name = method.partition("/")
    with tracing.tracer().start_as_current_span(
        method,
        context=context_from_metadata(invocation_metadata),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    ):
        yield
