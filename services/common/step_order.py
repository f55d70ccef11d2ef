"""Step ordering on the executor side: the scheduler sends step N+1 before step N returns (overlap
scheduling), and the two unary calls may arrive in either order. Used by the executor and by the
scheduler's fake executor (torch-free)."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("radixserve.step_order")

STEP_ORDER_TIMEOUT_S = 5.0


class StepOrder:
    """Lets Step calls through in step_id order: the scheduler sends step N+1 before step N returns,
    and the two calls may arrive in either order. The first step seen (after start or reset) sets
    the base; a lower step_id than expected means the scheduler restarted and sets it again."""

    def __init__(self, timeout_s: float = STEP_ORDER_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.next_id: int | None = None
        self._changed = asyncio.Condition()

    async def wait_turn(self, step_id: int) -> None:
        async with self._changed:
            if self.next_id is None or step_id < self.next_id:
                self.next_id = step_id
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.next_id is None or self.next_id >= step_id),
                    self.timeout_s,
                )
            except TimeoutError:
                log.warning(
                    "step %d: step %d did not arrive within %.0fs; running out of order",
                    step_id,
                    self.next_id,
                    self.timeout_s,
                )

    async def done(self, step_id: int) -> None:
        async with self._changed:
            self.next_id = max(self.next_id or 0, step_id + 1)
            self._changed.notify_all()

    async def reset(self) -> None:
        async with self._changed:
            self.next_id = None
            self._changed.notify_all()
