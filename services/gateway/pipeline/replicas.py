"""Calls to the replicas of a stateless service (tokenizer, detokenizer): round robin with failover.

--tokenizer-addr and --detokenizer-addr take a comma-separated list of host:port. Each call goes to
the next replica in turn; a call that fails with UNAVAILABLE (the replica is down or restarting) is
retried on the others, each at most once, before the error reaches the caller. A replica that
answered UNAVAILABLE within the last SUSPECT_S seconds is tried after the others. The calls are
idempotent (the detokenizer's state travels in each request), so a retry cannot do harm.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from radixserve.common.grpc_util import aio_channel, open_bidi
from radixserve.common.ordered_stream import OrderedExchange

log = logging.getLogger("radixserve.gateway.replicas")

SUSPECT_S = 2.0


def parse_addrs(value: str) -> list[str]:
    """The host:port entries of a comma-separated address flag."""
    addrs = [addr.strip() for addr in value.split(",") if addr.strip()]
    if not addrs:
        raise ValueError(f"no address in {value!r}")
    return addrs


class ReplicaSet:
    """Stands in for one stub of the service: `replicas.Encode(request, timeout=...)` is a balanced,
    failed-over call of the stub method of that name (unary methods; streams: exchange)."""

    def __init__(
        self,
        addrs: list[str],
        stub_class: Callable[[grpc.aio.Channel], Any],
        channel: Callable[[str], grpc.aio.Channel] = aio_channel,
        observe_exchange: Callable[[str, float], None] | None = None,
    ):
        self.addrs = list(addrs)
        self.channels = [channel(addr) for addr in self.addrs]
        self.stubs = [stub_class(ch) for ch in self.channels]
        self.calls = [0] * len(self.addrs)  # calls sent to each replica (for tests and debugging)
        self._next = 0
        self._failed_at = [float("-inf")] * len(self.addrs)
        self._streams: dict[tuple[str, int, int], OrderedExchange] = {}  # see exchange
        self._observe_exchange = observe_exchange  # (method, seconds) of each exchange answered

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        async def call(request, **kwargs):
            return await self.call(method, request, **kwargs)

        return call

    def _order(self) -> list[int]:
        """Replica indexes to try: round robin from the next one, recently failed ones last."""
        n = len(self.stubs)
        if n == 1:
            return [0]
        start, self._next = self._next, (self._next + 1) % n
        ring = [(start + i) % n for i in range(n)]
        now = time.monotonic()
        return sorted(ring, key=lambda i: now - self._failed_at[i] < SUSPECT_S)

    async def call(self, method: str, request, **kwargs):
        return await self._failover(
            method, lambda i: getattr(self.stubs[i], method)(request, **kwargs)
        )

    async def exchange(self, method: str, request, timeout: float, lane: int = 0):
        """One request over the bidirectional stream `method` (e.g. "DecodeStream", the stream form of
        a unary method: answers in order), with call()'s round robin and failover. Each replica keeps
        one open stream per lane; a caller uses one lane per exchange in flight."""

        async def on(i: int):
            key = (method, i, lane)
            stream = self._streams.get(key)
            if stream is None:
                stub = self.stubs[i]
                stream = self._streams[key] = OrderedExchange(
                    lambda: open_bidi(getattr(stub, method))
                )
            start = time.perf_counter()
            answer = await stream.exchange(request, timeout)
            if self._observe_exchange is not None:
                self._observe_exchange(method, time.perf_counter() - start)
            return answer

        return await self._failover(method, on)

    async def _failover(self, method: str, send: Callable[[int], Awaitable]):
        """send(i) to the replicas in _order(): the first answer, or the error of a call that failed with
        anything but UNAVAILABLE, or of the last replica tried."""
        order = self._order()
        for attempt, i in enumerate(order):
            self.calls[i] += 1
            try:
                return await send(i)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._failed_at[i] = time.monotonic()
                if attempt == len(order) - 1:
                    raise
                log.warning(
                    "%s on %s failed (UNAVAILABLE); trying another replica", method, self.addrs[i]
                )

    async def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        for channel in self.channels:
            await channel.close()
