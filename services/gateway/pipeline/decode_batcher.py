"""Coalesces the detokenizer calls of concurrent requests into batches on Detokenizer.DecodeStream.

Up to max_inflight batches are in flight at a time (one per detokenizer replica: the replica set
spreads them over the replicas), each on an open stream of its own; items that arrive meanwhile ride
the next one. A lone request pays no extra latency (its item is sent at once); N concurrent streams
cost about one exchange per scheduler step instead of N.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from radixserve.v1 import detokenizer_pb2, detokenizer_pb2_grpc
from radixserve.gateway.api.errors import from_grpc

MAX_BATCH_ITEMS = 512


class DecodeBatcher:
    def __init__(
        self,
        stub: Callable[[], detokenizer_pb2_grpc.DetokenizerStub],
        timeout_s: float,
        max_inflight: int = 1,
    ):
        self._stub = stub
        self._timeout_s = timeout_s
        self._max_inflight = max(1, max_inflight)
        self._pending: list[tuple[detokenizer_pb2.DetokenizerDecodeItem, asyncio.Future]] = []
        self._pumps: set[asyncio.Task] = set()
        self._lanes_busy: set[int] = set()  # each pump sends on a stream of its own (its lane)
        self.rpcs = 0  # batches sent (for tests and debugging)

    async def decode(
        self, item: detokenizer_pb2.DetokenizerDecodeItem
    ) -> detokenizer_pb2.DetokenizerDecodeResult:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._pumps = {pump for pump in self._pumps if not pump.done()}
        if len(self._pumps) < self._max_inflight:
            self._pumps.add(asyncio.create_task(self._pump()))
        return await future

    async def _pump(self) -> None:
        lane = min(set(range(self._max_inflight)) - self._lanes_busy)
        self._lanes_busy.add(lane)
        try:
            await self._pump_on(lane)
        finally:
            self._lanes_busy.discard(lane)

    async def _pump_on(self, lane: int) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH_ITEMS], self._pending[MAX_BATCH_ITEMS:]
            batch = [
                (item, future) for item, future in batch if not future.done()
            ]  # drop cancelled callers
            if not batch:
                continue
            self.rpcs += 1
            try:
                resp = await self._stub().exchange(
                    "DecodeStream",
                    detokenizer_pb2.DetokenizerDecodeRequest(items=[item for item, _ in batch]),
                    self._timeout_s,
                    lane,
                )
            except grpc.aio.AioRpcError as e:
                error = from_grpc(e, "detokenizer")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, resp.results):
                if not future.done():
                    future.set_result(result)
