"""The scheduler's spans of each traced request, derived from the step loop (a RuntimeObserver):

    scheduler.request            child of the gateway's `generate` span (its TraceContext)
      ├─ queue                   arrival -> first admission
      ├─ prefill                 admission -> first token; one `chunk` event per planned chunk
      └─ decode                  first token -> finish; token count as an attribute, no span per token

The executor's spans of the request become children of `scheduler.request`: on submission the
request's trace_context is replaced by that span's, and the core hands it to the executor with the
request. Requests without a trace context cost one dict lookup per step.
"""

from __future__ import annotations

import time

from radixserve.common import tracing
from radixserve.common.step import StepInput
from radixserve.scheduler.request import FinishReason, Request, RequestEvent
from radixserve.scheduler.runtime import RuntimeObserver

_FINISH_NAMES = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORT: "abort",
}


class _RequestSpans:
    def __init__(self, req: Request, parent):
        from opentelemetry.trace import set_span_in_context

        tracer = tracing.tracer()
        self.arrival = time.monotonic()
        self.request = tracer.start_span(
            "scheduler.request",
            context=parent,
            attributes={
                "radixserve.request_id": req.request_id,
                "gen_ai.usage.input_tokens": len(req.prompt_ids),
                "gen_ai.request.max_tokens": req.stopping.max_new_tokens,
            },
        )
        self.context = set_span_in_context(self.request)
        self.phase = tracer.start_span("queue", context=self.context)
        self.phase_name = "queue"
        self.chunks = 0
        self.generated = 0

    def _next_phase(self, name: str, **attributes) -> None:
        self.phase.end()
        self.phase = tracing.tracer().start_span(name, context=self.context, attributes=attributes)
        self.phase_name = name

    def admitted(self, tokens: int, step_id: int, cached: int, resumed_after: int) -> None:
        if self.phase_name == "queue":
            self.request.set_attribute(
                "radixserve.queue_ms", round((time.monotonic() - self.arrival) * 1000, 3)
            )
            self._next_phase("prefill", **{"radixserve.cached_tokens": cached})
        elif self.phase_name == "decode":  # a retracted request admitted again
            self.request.add_event(
                "readmitted_after_retraction", {"radixserve.generated_tokens": resumed_after}
            )
        self.chunk(tokens, step_id)

    def chunk(self, tokens: int, step_id: int) -> None:
        self.chunks += 1
        self.phase.add_event("chunk", {"radixserve.tokens": tokens, "radixserve.step_id": step_id})

    def tokens(self, n: int) -> None:
        if not self.generated:
            self.request.set_attribute(
                "radixserve.ttft_ms", round((time.monotonic() - self.arrival) * 1000, 3)
            )
            self.phase.set_attribute("radixserve.chunks", self.chunks)
            self._next_phase("decode")
        self.generated += n

    def finish(self, event: RequestEvent) -> None:
        reason = _FINISH_NAMES.get(event.finish_reason, "abort")
        self.phase.set_attribute("gen_ai.usage.output_tokens", event.completion_tokens)
        self.phase.end()
        self.request.set_attributes(
            {
                "gen_ai.response.finish_reasons": [reason],
                "gen_ai.usage.output_tokens": event.completion_tokens,
                "radixserve.cached_tokens": event.cached_tokens,
            }
        )
        self.request.end()

    def fail(self, message: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.phase.end()
        self.request.set_status(Status(StatusCode.ERROR, message[:200]))
        self.request.end()


class RequestTracer(RuntimeObserver):
    def __init__(self):
        self.live: dict[str, _RequestSpans] = {}

    def submitted(self, req: Request) -> None:
        parent = tracing.context_from_proto(req.trace_context)
        if parent is None:
            return
        spans = self.live[req.request_id] = _RequestSpans(req, parent)
        req.trace_context = tracing.span_to_proto(spans.request)

    def sent(self, plan: StepInput) -> None:
        if not self.live:
            return
        for new in plan.new_requests:
            if (spans := self.live.get(new.request_id)) is not None:
                spans.admitted(
                    len(new.input_ids), plan.step_id, len(new.prefix_slots), new.generated_tokens
                )
        for cont in plan.continuing_requests:
            if cont.input_ids and (spans := self.live.get(cont.request_id)) is not None:
                spans.chunk(len(cont.input_ids), plan.step_id)

    def dispatched(self, events: list[RequestEvent]) -> None:
        if not self.live:
            return
        for event in events:
            if (spans := self.live.get(event.request_id)) is None:
                continue
            if event.token_ids:
                spans.tokens(len(event.token_ids))
            if event.finished:
                spans.finish(event)
                del self.live[event.request_id]

    def failed(self, request_ids: list[str], message: str) -> None:
        for rid in request_ids:
            if (spans := self.live.pop(rid, None)) is not None:
                spans.fail(message)
