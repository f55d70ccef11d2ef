"""What the gateway observes of one generation, in one object for Engine.stream: its Prometheus
metrics (--enable-metrics), its `generate` span (--otlp-traces-endpoint) and its log lines
(--log-requests). This object owns the request's timings and counts and ends it exactly once;
metrics and span are told. Log lines carry the request id and trace id (services/common/log.py)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from radixserve.common.log import request_id
from radixserve.gateway.pipeline.generation import PreparedRequest
from radixserve.gateway.telemetry.metrics import GatewayMetrics
from radixserve.gateway.telemetry.request_tracing import NO_TRACE, RequestTrace

log = logging.getLogger("radixserve.gateway.requests")


class RequestTelemetry:
    def __init__(
        self,
        req: PreparedRequest,
        model: str,
        metrics: GatewayMetrics | None,
        log_requests: bool,
        record: bool = True,
    ):
        """record=False (health probes): no metrics, no span, no log line."""
        self.prompt_tokens = len(req.input_ids)
        self.metrics = metrics if record else None
        self.trace = (
            RequestTrace.start(
                req.request_id, model, self.prompt_tokens, req.sampling, req.stopping
            )
            if record
            else NO_TRACE
        )
        self.log = log_requests and record
        self.request_id = req.request_id
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_tokens_at = 0.0
        self.generated = 0
        self.ended = False
        if record:
            request_id.set(req.request_id)
        if self.log:
            s = req.sampling
            self._log(
                "request started: %d prompt tokens, max_new_tokens %d, temperature %g, top_p %g, top_k %d%s",
                self.prompt_tokens,
                req.stopping.max_new_tokens,
                s.temperature,
                s.top_p,
                s.top_k,
                f", seed {s.seed}" if s.seed is not None else "",
            )

    @property
    def trace_context(self):
        return self.trace.trace_context

    def decode_context(self, final: bool):
        return self.trace.decode_context(final)

    def decoded(self, seconds: float) -> None:
        self.trace.decoded(seconds)

    def tokens(self, n: int) -> None:
        """A message with n new tokens reached the client side."""
        if not n:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            if self.metrics is not None:
                self.metrics.first_token(now - self.started)
            self.trace.first_token(now - self.started)
        elif self.metrics is not None:
            self.metrics.later_tokens(now - self.last_tokens_at, n)
        self.last_tokens_at = now
        self.generated += n

    def finish(self, reason: str, completion_tokens: int, cached_tokens: int) -> None:
        if self._end(reason):
            self.trace.finish(reason, self.prompt_tokens, completion_tokens, cached_tokens)
            self._log_end(f"finished: {reason}", completion_tokens, cached_tokens)

    def fail(self, error: BaseException) -> None:
        if self._end(None):
            self.trace.fail(error)
            self._log_end(f"failed: {error}", self.generated, 0)

    def close(self) -> None:
        """Called from the stream's `finally`: a request not ended by now was abandoned by its
        client (abort) or failed with the exception being raised."""
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, (GeneratorExit, asyncio.CancelledError)):
            self.fail(error)
        elif self._end("abort"):
            self.trace.finish("abort", self.prompt_tokens, self.generated, 0)
            self._log_end("finished: abort (client went away)", self.generated, 0)

    def _end(self, reason: str | None) -> bool:
        """Record the end (reason None: failed) unless it was recorded already."""
        if self.ended:
            return False
        self.ended = True
        if self.metrics is not None:
            self.metrics.ended(
                self.prompt_tokens, self.generated, reason, time.perf_counter() - self.started
            )
        return True

    def _log_end(self, outcome: str, completion_tokens: int, cached_tokens: int) -> None:
        if self.log:
            ttft = (
                f"{(self.first_token_at - self.started) * 1000:.1f} ms"
                if self.first_token_at
                else "-"
            )
            self._log(
                "request %s: %d prompt tokens (%d cached), %d completion tokens, TTFT %s, latency %.1f ms",
                outcome,
                self.prompt_tokens,
                cached_tokens,
                completion_tokens,
                ttft,
                (time.perf_counter() - self.started) * 1000,
            )

    def _log(self, message: str, *args) -> None:
        """Log with this request's id: a stream's later steps may run in another task's context."""
        token = request_id.set(self.request_id)
        try:
            log.info(message, *args)
        finally:
            request_id.reset(token)
