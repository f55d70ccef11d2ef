"""Times the phases of a service's start for one log line, e.g. `startup: resolve model 0.1s, load weights
3.2s, KV pool 0.4s, CUDA graphs 11.8s, warm-up 6.0s (total 21.5s)`."""

from __future__ import annotations

import contextlib
import time


class PhaseClock:
    def __init__(self):
        self.phases: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - t0))

    def seconds(self, name: str) -> float:
        return sum(s for n, s in self.phases if n == name)

    def summary(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.phases)
        return f"{parts} (total {sum(s for _, s in self.phases):.1f}s)"
