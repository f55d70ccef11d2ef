"""The executor's spans (with tracing on), from the step messages' TraceContext fields:

- `executor.step`: one per step that serves at least one traced request, the root of its own trace
  (a step serves many requests, so it cannot be the child of one), linked to the scheduler span of
  every traced request it served; batch size, token counts and forward time as attributes.
- `executor.prefill`: one per traced request per step that runs its prompt tokens (a prefill or a
  chunk of one), a child of the request's scheduler span and linked to that step's span: this is
  where the request's own trace shows the executor.

Decode steps of a request are therefore found through the step spans' links, not one span per
token in the request's trace.
"""

from __future__ import annotations

from radixserve.v1 import executor_pb2
from radixserve.common import tracing


class StepTracer:
    def __init__(self):
        self.parents: dict[str, object] = {}  # request id -> its scheduler span's Context

    def start(self, step: executor_pb2.ExecutorStepRequest):
        """Spans for this step, or None when it serves no traced request; pass it to end()."""
        for rid in step.finished_request_ids:
            self.parents.pop(rid, None)
        for new in step.new_requests:
            if new.HasField("trace_context"):
                parent = tracing.context_from_proto(new.trace_context)
                if parent is not None:
                    self.parents[new.request_id] = parent
        if not self.parents:
            return None
        prefills = [
            (r.request_id, len(r.input_ids))
            for r in step.new_requests
            if r.request_id in self.parents
        ]
        prefills += [
            (r.request_id, len(r.input_ids))
            for r in step.continuing_requests
            if r.input_ids and r.request_id in self.parents
        ]
        decodes = [
            r.request_id
            for r in step.continuing_requests
            if not r.input_ids and r.request_id in self.parents
        ]
        traced = [rid for rid, _ in prefills] + decodes
        if not traced:
            return None
        from opentelemetry.trace import Link, get_current_span

        tracer = tracing.tracer()
        step_span = tracer.start_span(
            "executor.step",
            links=[Link(get_current_span(self.parents[rid]).get_span_context()) for rid in traced],
            attributes={
                "radixserve.step_id": step.step_id,
                "radixserve.batch_size": len(step.new_requests) + len(step.continuing_requests),
                "radixserve.new_requests": len(step.new_requests),
                "radixserve.prefill_tokens": sum(len(r.input_ids) for r in step.new_requests)
                + sum(len(r.input_ids) for r in step.continuing_requests),
                "radixserve.traced_requests": len(traced),
            },
        )
        prefill_spans = [
            tracer.start_span(
                "executor.prefill",
                context=self.parents[rid],
                links=[Link(step_span.get_span_context())],
                attributes={
                    "radixserve.request_id": rid,
                    "radixserve.tokens": n,
                    "radixserve.step_id": step.step_id,
                },
            )
            for rid, n in prefills
        ]
        return step_span, prefill_spans

    @staticmethod
    def end(spans, forward_ms: float | None = None, error: BaseException | None = None) -> None:
        if spans is None:
            return
        step_span, prefill_spans = spans
        if forward_ms is not None:
            step_span.set_attribute("radixserve.forward_ms", round(forward_ms, 3))
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            step_span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        for span in prefill_spans:
            span.end()
        step_span.end()

    def reset(self) -> None:
        self.parents.clear()
