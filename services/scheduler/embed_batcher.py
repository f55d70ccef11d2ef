"""EmbedBatcher: concurrent Embed calls -> executor Embed calls of bounded size (--is-embedding).

Sequences queue in arrival order. One executor call is in flight at a time (the executor runs them
one after another anyway), and the sequences that arrive meanwhile make up the next call: it takes
queued sequences in order while the padded batch, sequences x longest sequence, stays within
max_batch_tokens (--max-prefill-tokens); a sequence longer than that goes alone. A caller's
sequences may thus be split over calls; embed() gathers their vectors back in order. With max_queued
(--max-queued-requests) a caller's sequences are queued all or none: more than max_queued can never
be (INVALID_ARGUMENT), more than the room left now is RESOURCE_EXHAUSTED. A cancelled caller's
sequences still queued are dropped. This runs
apart from the generation step loop: an embedding server has no KV pool and runs no steps.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import grpc

from radixserve.v1 import common_pb2, executor_pb2, executor_pb2_grpc
from radixserve.scheduler.queue_limit import queue_refusal

log = logging.getLogger("radixserve.scheduler.embed")

EXECUTOR_EMBED_TIMEOUT_S = 300.0


class EmbedFailed(Exception):
    """The executor call that held a caller's sequences failed; code and message are for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Embeddings:
    dimension: int
    values: list[float]  # row-major [num_sequences, dimension]
    normalized: bool


@dataclass
class _Pending:
    ids: list[int]
    result: asyncio.Future  # -> (vector, normalized)


class EmbedBatcher:
    def __init__(
        self,
        executor: executor_pb2_grpc.ExecutorStub,
        max_batch_tokens: int,
        max_queued: int | None = None,
    ):
        self.executor = executor
        self.max_batch_tokens = max_batch_tokens
        self.max_queued = max_queued
        self.queue: deque[_Pending] = deque()
        self.wake = asyncio.Event()
        self.executor_calls = 0

    async def embed(self, sequences: list[list[int]]) -> Embeddings:
        """The vectors of sequences, in order; raises EmbedFailed."""
        self._check_room(len(sequences))
        loop = asyncio.get_running_loop()
        pending = [_Pending(ids, loop.create_future()) for ids in sequences]
        self.queue.extend(pending)
        self.wake.set()
        try:
            results = await asyncio.gather(*(p.result for p in pending))
        finally:
            for p in pending:  # after a failure or a cancelled caller: run() skips what is left
                p.result.cancel()
        values = [x for vector, _ in results for x in vector]
        return Embeddings(len(results[0][0]), values, results[0][1])

    def _check_room(self, count: int) -> None:
        self.queue = deque(
            p for p in self.queue if not p.result.done()
        )  # callers gone: not waiting
        refusal = queue_refusal(count, len(self.queue), self.max_queued, "inputs", "inputs")
        if refusal is not None:
            raise EmbedFailed(*refusal)

    async def run(self) -> None:
        """Send batches to the executor until cancelled."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            while batch := self._next_batch():
                await self._run_batch(batch)

    def _next_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        longest = 0
        while self.queue:
            item = self.queue[0]
            if item.result.done():  # its caller is gone
                self.queue.popleft()
                continue
            longest_with = max(longest, len(item.ids))
            if batch and (len(batch) + 1) * longest_with > self.max_batch_tokens:
                break
            batch.append(self.queue.popleft())
            longest = longest_with
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        request = executor_pb2.ExecutorEmbedRequest(
            sequences=[common_pb2.TokenIds(ids=p.ids) for p in batch]
        )
        self.executor_calls += 1
        try:
            response = await self.executor.Embed(request, timeout=EXECUTOR_EMBED_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.warning(
                "executor Embed of %d sequences failed: %s %s",
                len(batch),
                e.code().name,
                e.details(),
            )
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                failure = EmbedFailed(e.code(), e.details())
            else:
                failure = EmbedFailed(
                    grpc.StatusCode.UNAVAILABLE, f"the executor failed to embed ({e.code().name})"
                )
            self._fail(batch, failure)
            return
        except Exception:  # anything else must not end run(): later callers would wait forever
            log.exception("executor Embed of %d sequences failed", len(batch))
            self._fail(
                batch, EmbedFailed(grpc.StatusCode.INTERNAL, "embedding failed in the scheduler")
            )
            return
        dim = response.dimension
        for i, p in enumerate(batch):
            if not p.result.done():
                p.result.set_result(
                    (response.embeddings[i * dim : (i + 1) * dim], response.normalized)
                )

    @staticmethod
    def _fail(batch: list[_Pending], failure: EmbedFailed) -> None:
        for p in batch:
            if not p.result.done():
                p.result.set_exception(failure)
