"""The scheduler's decode log line: every DECODE_LOG_INTERVAL decode steps, one INFO line with the
running batch, KV use, generation throughput and, with speculative decoding, the average accepted
length per verify step over those steps (SGLang's "Decode batch" line, on a fixed interval)."""

from __future__ import annotations

import logging
import time

from radixserve.common.step import StepInput
from radixserve.scheduler.core import Scheduler
from radixserve.scheduler.request import RequestEvent
from radixserve.scheduler.runtime import RuntimeObserver

log = logging.getLogger("radixserve.scheduler.decode")

DECODE_LOG_INTERVAL = 40  # decode steps per line (SGLang's --decode-log-interval default)


class DecodeLog(RuntimeObserver):
    def __init__(self, core: Scheduler, interval: int = DECODE_LOG_INTERVAL, clock=time.monotonic):
        self.core = core
        self.interval = interval
        self.clock = clock
        self._start(clock())

    def _start(self, now: float) -> None:
        self.steps = 0
        self.tokens = 0
        self.since = now
        stats = self.core.spec_stats
        self.verify_steps, self.accepted = stats.verify_steps, stats.accepted_tokens

    def dispatched(self, events: list[RequestEvent]) -> None:
        self.tokens += sum(len(e.token_ids) for e in events)

    def completed(self, plan: StepInput, seconds: float) -> None:
        if plan.is_prefill:
            return
        self.steps += 1
        if self.steps >= self.interval:
            log.info("%s", self.line())
            self._start(self.clock())

    def line(self) -> str:
        """The line for the decode steps since the last one."""
        stats = self.core.stats()
        elapsed = max(self.clock() - self.since, 1e-9)
        text = (
            f"decode: {self.steps} steps, running {stats.running}, waiting {stats.waiting}, "
            f"KV {stats.in_use}/{stats.pool_tokens} tokens, gen throughput "
            f"{self.tokens / elapsed:.1f} tok/s"
        )
        if self.core.decode.spec is not None:
            spec = self.core.spec_stats
            verify_steps = spec.verify_steps - self.verify_steps
            accepted = spec.accepted_tokens - self.accepted
            length = f"{1 + accepted / verify_steps:.2f}" if verify_steps else "-"
            text += f", accept len {length} ({verify_steps} verify steps)"
        return text
