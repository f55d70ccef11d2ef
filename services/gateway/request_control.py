"""Ending generations from outside their own response: POST /abort_request and --request-timeout.

Both go through the scheduler's Abort, which ends the request in every stage (the executor drops it,
its KV is freed); the request's own stream then finishes with finish_reason "abort", so a response
still goes out whole. The abort is repeated for a while, in case it reached the scheduler before the
request did.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc
from fastapi import Request

from radixserve.v1 import scheduler_pb2
from radixserve.gateway.engine import UNARY_TIMEOUT_S, Engine
from radixserve.gateway.errors import ApiError, bad_request, from_grpc
from radixserve.gateway.generation import PreparedRequest

log = logging.getLogger("radixserve.gateway.requests")

ABORT_RETRY_S = 0.2
ABORT_RETRIES = 10


class LiveRequests:
    """The REST API's generations in flight, by the id their client sees (the response's `id`,
    /generate's meta_info.id), each with its scheduler request ids (one per choice)."""

    def __init__(self, engine: Engine, timeout_s: float | None):
        self.engine = engine
        self.timeout_s = timeout_s
        self.groups: dict[str, list[str]] = {}
        self._tasks: set[asyncio.Task] = set()

    @contextlib.contextmanager
    def track(self, api_id: str, requests: list[PreparedRequest], started: float):
        """While inside, the requests can be aborted by api_id and are aborted at the deadline."""
        if api_id in self.groups:
            raise bad_request(f"request id {api_id!r} is already in use", param="rid", code="duplicate_request_id")
        ids = [r.request_id for r in requests]
        self.groups[api_id] = ids
        timer = None
        if self.timeout_s:
            delay = max(0.0, started + self.timeout_s - time.monotonic())
            timer = asyncio.get_running_loop().call_later(delay, self._expire, api_id, ids)
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()
            if self.groups.get(api_id) is ids:
                del self.groups[api_id]

    async def tracked_events(self, api_id: str, requests: list[PreparedRequest], started: float,
                             events: AsyncIterator[dict]) -> AsyncIterator[dict]:
        """events (a streamed response's) with its requests tracked until the stream ends."""
        with self.track(api_id, requests, started):
            try:
                async for event in events:
                    yield event
            finally:
                await events.aclose()

    async def abort(self, rid: str) -> int:
        """Abort one API request (all its choices) or one scheduler request by id; how many ended."""
        ids = self.groups.get(rid)
        aborted = await self._scheduler_abort(ids or [rid])
        if ids is not None:
            self._spawn(self._abort_until_ended(rid, ids))
            return max(aborted, 1)
        return aborted

    async def abort_all(self) -> int:
        """Abort every request of the scheduler (this gateway's and any other client's)."""
        aborted = await self._scheduler_abort([], abort_all=True)
        for api_id, ids in list(self.groups.items()):
            self._spawn(self._abort_until_ended(api_id, ids))
        return aborted

    def _expire(self, api_id: str, ids: list[str]) -> None:
        log.warning("request %s ran past --request-timeout (%gs); aborting it", api_id, self.timeout_s)
        self._spawn(self._abort_until_ended(api_id, ids, first_now=True))

    async def _abort_until_ended(self, api_id: str, ids: list[str], first_now: bool = False) -> None:
        for attempt in range(ABORT_RETRIES):
            if attempt or not first_now:
                await asyncio.sleep(ABORT_RETRY_S)
            if self.groups.get(api_id) is not ids:
                return
            try:
                await self._scheduler_abort(ids)
            except ApiError as e:
                log.warning("aborting request %s failed: %s", api_id, e.message)

    async def _scheduler_abort(self, ids: list[str], abort_all: bool = False) -> int:
        try:
            resp = await self.engine.stubs().scheduler.Abort(
                scheduler_pb2.SchedulerAbortRequest(request_ids=ids, abort_all=abort_all), timeout=UNARY_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, "scheduler") from None
        return resp.aborted

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def live_requests(request: Request) -> LiveRequests:
    """The app's LiveRequests, made on first use."""
    state = request.app.state
    live = getattr(state, "live_requests", None)
    if live is None:
        live = state.live_requests = LiveRequests(state.engine, state.args.request_timeout)
    return live
