"""Ending generations from outside their own response: POST /abort_request and --request-timeout.

A tracked API request's generations are ended through its Cancellation: the abort goes down the
scheduler Session stream that started them, behind their start (so it cannot miss them while they are
in transit or being prepared), one batch for all of its sequences; the scheduler takes them out of
its queues and frees their KV within a step, and each stream then finishes with finish_reason
"abort", so a response still goes out whole. --request-timeout counts from the request's arrival:
preparation (tokenizing) past it is a 504, generation past it is cancelled. Ids the gateway does not
track (another client's) are aborted with the scheduler's Abort call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from fastapi import Request

from radixserve.v1 import scheduler_pb2
from radixserve.gateway.pipeline.engine import UNARY_TIMEOUT_S, Engine
from radixserve.gateway.api.errors import ApiError, bad_request, from_grpc
from radixserve.gateway.pipeline.generation import Cancellation, PreparedRequest

log = logging.getLogger("radixserve.gateway.requests")

T = TypeVar("T")


class Deadline:
    """--request-timeout for one API request, from its arrival (`started`, time.monotonic())."""

    def __init__(self, timeout_s: float | None, started: float):
        self.timeout_s = timeout_s or None
        self.at = started + timeout_s if timeout_s else None

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    async def run(self, work: Awaitable[T]) -> T:
        """Await work (preparation: tokenizing, an embedding call); cancelled at the deadline: a 504."""
        remaining = self.remaining()
        if remaining is None:
            return await work
        try:
            async with asyncio.timeout(remaining) as scope:
                return await work
        except TimeoutError:
            if not scope.expired():
                raise
            raise self.error() from None

    def error(self) -> ApiError:
        return ApiError(
            504,
            f"the request did not finish within --request-timeout ({self.timeout_s:g}s)",
            code="request_timeout",
        )

    def arm(self, cancellation: Cancellation, what: str) -> asyncio.TimerHandle | None:
        """Cancel the generations at the deadline; the handle's cancel() disarms it."""
        if self.at is None:
            return None

        def expire() -> None:
            aborted = cancellation.cancel()
            log.warning(
                "request %s ran past --request-timeout (%gs); aborted %d sequences",
                what,
                self.timeout_s,
                aborted,
            )

        return asyncio.get_running_loop().call_later(self.remaining(), expire)


@dataclass
class _Tracked:
    ids: list[str]  # the scheduler request ids, one per sequence
    cancellation: Cancellation


class LiveRequests:
    """The REST API's generations in flight, by the id their client sees (the response's `id`,
    /generate's meta_info.id), each with its scheduler request ids (one per sequence)."""

    def __init__(self, engine: Engine, timeout_s: float | None):
        self.engine = engine
        self.timeout_s = timeout_s
        self.groups: dict[str, _Tracked] = {}

    def deadline(self, started: float) -> Deadline:
        return Deadline(self.timeout_s, started)

    @contextlib.contextmanager
    def track(
        self,
        api_id: str,
        requests: list[PreparedRequest],
        started: float,
        cancellation: Cancellation,
    ):
        """While inside, the requests can be aborted by api_id and are cancelled at the deadline (generate
        them with this cancellation)."""
        if api_id in self.groups:
            raise bad_request(
                f"request id {api_id!r} is already in use", param="rid", code="duplicate_request_id"
            )
        tracked = _Tracked([r.request_id for r in requests], cancellation)
        self.groups[api_id] = tracked
        timer = self.deadline(started).arm(cancellation, api_id)
        try:
            yield cancellation
        finally:
            if timer is not None:
                timer.cancel()
            if self.groups.get(api_id) is tracked:
                del self.groups[api_id]

    async def tracked_events(
        self,
        api_id: str,
        requests: list[PreparedRequest],
        started: float,
        cancellation: Cancellation,
        events: AsyncIterator[dict],
    ) -> AsyncIterator[dict]:
        """events (a streamed response's) with its requests tracked until the stream ends."""
        with self.track(api_id, requests, started, cancellation):
            try:
                async for event in events:
                    yield event
            finally:
                await events.aclose()

    async def abort(self, rid: str) -> int:
        """Abort one API request (all its sequences) or one scheduler request by id; how many ended."""
        tracked = self.groups.get(rid)
        if tracked is not None:
            return max(tracked.cancellation.cancel(), 1)
        return await self._scheduler_abort([rid])

    async def abort_all(self) -> int:
        """Abort every request of the scheduler (this gateway's and any other client's)."""
        aborted = await self._scheduler_abort([], abort_all=True)
        for tracked in list(self.groups.values()):
            tracked.cancellation.cancel()  # also those not in the scheduler yet
        return aborted

    async def _scheduler_abort(self, ids: list[str], abort_all: bool = False) -> int:
        try:
            resp = await self.engine.stubs().scheduler.Abort(
                scheduler_pb2.SchedulerAbortRequest(request_ids=ids, abort_all=abort_all),
                timeout=UNARY_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, "scheduler") from None
        return resp.aborted


def live_requests(request: Request) -> LiveRequests:
    """The app's LiveRequests, made on first use."""
    state = request.app.state
    live = getattr(state, "live_requests", None)
    if live is None:
        live = state.live_requests = LiveRequests(state.engine, state.args.request_timeout)
    return live
