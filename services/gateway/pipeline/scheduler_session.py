"""The gateway's end of the scheduler's Session stream: one gRPC stream carries every request.

Requests start and abort by writing actions to the stream; a reader task routes each step's events
to the queue of the request they belong to. When the stream breaks (scheduler restarted, network),
every open request gets the error and the next request opens a new stream.

The sequences of one API request start in one generate_group action (queued all or none). Aborts go
down the same stream, so one can never overtake the start of its request, and those of one event-loop
turn travel as one abort action: ending a request of many sequences costs the scheduler one batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from radixserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from radixserve.common.grpc_util import open_bidi

log = logging.getLogger("radixserve.gateway.session")


class RequestFailed(Exception):
    """The scheduler ended a request with an error status (or the stream carrying it broke); stage: the
    one that failed it, a scheduler_pb2.FailedStage (SchedulerRequestError.failed_stage)."""

    def __init__(
        self, code: grpc.StatusCode, details: str, stage: int = scheduler_pb2.FAILED_STAGE_SCHEDULER
    ):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.stage = stage


class DuplicateRequestId(ValueError):
    """start() was given the id of a request still open on this session."""


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


class RequestEvents:
    """The scheduler's messages for one request; iterate, then close (aborts it if unfinished)."""

    def __init__(self, session: "SchedulerSession", request_id: str, queue: asyncio.Queue):
        self._session = session
        self.request_id = request_id
        self._queue = queue
        self.done = False
        self.cancelled = (
            False  # cancel(): ends with an abort finish, also when it had not started yet
        )

    def __aiter__(self):
        return self

    async def __anext__(self) -> scheduler_pb2.SchedulerGenerateResponse:
        if self.done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, RequestFailed):
            self.done = True
            if (
                self.cancelled and item.code == grpc.StatusCode.CANCELLED
            ):  # aborted before it started
                return scheduler_pb2.SchedulerGenerateResponse(
                    request_id=self.request_id, finish_reason=common_pb2.FINISH_REASON_ABORT
                )
            raise item
        if item.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.done = True
        return item

    def close(self) -> None:
        if not self.done:
            self.done = True
            self._session.abort(self.request_id)


class SchedulerSession:
    def __init__(self, stub: Callable[[], scheduler_pb2_grpc.SchedulerStub]):
        self._stub = stub
        self._call = None
        self._outbox: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._events: dict[str, RequestEvents] = {}  # of the open requests, for cancel()
        self._aborts: list[str] = []  # to send at the end of this event-loop turn
        self._aborts_outbox: asyncio.Queue | None = None  # the stream they belong to

    def start(self, msg: scheduler_pb2.SchedulerGenerateRequest) -> RequestEvents:
        """Send a generate action; msg.request_id must be set and not in use."""
        return self.start_group([msg])[0]

    def start_group(
        self, msgs: list[scheduler_pb2.SchedulerGenerateRequest]
    ) -> list[RequestEvents]:
        """Send requests as one group (queued all or none; see SchedulerGenerateGroup); request ids
        must be set, distinct and not in use."""
        ids = [msg.request_id for msg in msgs]
        clash = next((rid for rid in ids if rid in self._queues), None)
        if clash is None and len(set(ids)) != len(ids):
            clash = next(rid for i, rid in enumerate(ids) if rid in ids[:i])
        if clash is not None:
            raise DuplicateRequestId(f"request id {clash} is already in use")
        self._ensure_open()
        streams = []
        for rid in ids:
            queue: asyncio.Queue = asyncio.Queue()
            self._queues[rid] = queue
            streams.append(events := RequestEvents(self, rid, queue))
            self._events[rid] = events
        if len(msgs) == 1:
            action = scheduler_pb2.SchedulerSessionRequest(generate=msgs[0])
        else:
            action = scheduler_pb2.SchedulerSessionRequest(
                generate_group=scheduler_pb2.SchedulerGenerateGroup(requests=msgs)
            )
        self._outbox.put_nowait(action)
        return streams

    def abort(self, request_id: str) -> None:
        """Abort a request and forget it (nothing more of it is delivered)."""
        self._events.pop(request_id, None)
        if self._queues.pop(request_id, None) is not None:
            self._send_abort(request_id)

    def cancel(self, streams: list[RequestEvents]) -> int:
        """Abort open requests (as start_group returned them) but keep them: each still ends with a
        finish event (FINISH_REASON_ABORT, after whatever tokens came before it). Returns how many were
        still open."""
        found = 0
        for events in streams:
            rid = events.request_id
            if self._events.get(rid) is events and not events.cancelled and not events.done:
                events.cancelled = True
                self._send_abort(rid)
                found += 1
        return found

    def _send_abort(self, request_id: str) -> None:
        """Queue an abort action; those of one event-loop turn go out as one, after every start
        already written (so an abort never overtakes its request)."""
        if self._outbox is None:
            return
        if self._aborts_outbox is not self._outbox:
            self._aborts, self._aborts_outbox = [], self._outbox
            asyncio.get_running_loop().call_soon(self._flush_aborts)
        self._aborts.append(request_id)

    def _flush_aborts(self) -> None:
        ids, outbox = self._aborts, self._aborts_outbox
        self._aborts, self._aborts_outbox = [], None
        if ids and outbox is not None and outbox is self._outbox:
            outbox.put_nowait(
                scheduler_pb2.SchedulerSessionRequest(
                    abort=scheduler_pb2.SchedulerAbortRequest(request_ids=ids)
                )
            )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        self._fail_open_requests(
            RequestFailed(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        )
        self._call = self._outbox = None
        self._tasks = []

    # ---- the stream ----

    def _ensure_open(self) -> None:
        if self._call is not None:
            return
        call = open_bidi(self._stub().Session)
        outbox: asyncio.Queue = asyncio.Queue()
        self._call, self._outbox = call, outbox
        self._tasks = [
            asyncio.create_task(self._write(call, outbox), name="scheduler-session-writer"),
            asyncio.create_task(self._read(call), name="scheduler-session-reader"),
        ]

    async def _write(self, call, outbox: asyncio.Queue) -> None:
        try:
            while True:
                await call.write(await outbox.get())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            log.debug("scheduler session write ended: %s", e)  # the reader reports the failure

    async def _read(self, call) -> None:
        try:
            async for msg in call:
                for event in msg.events:
                    queue = self._queues.get(event.request_id)
                    if queue is not None:
                        queue.put_nowait(event)
                        if event.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                            del self._queues[event.request_id]
                            self._events.pop(event.request_id, None)
                for error in msg.errors:
                    queue = self._queues.pop(error.request_id, None)
                    self._events.pop(error.request_id, None)
                    if queue is not None:
                        code = _STATUS_BY_VALUE.get(error.code, grpc.StatusCode.UNKNOWN)
                        queue.put_nowait(RequestFailed(code, error.message, error.failed_stage))
            failure = RequestFailed(grpc.StatusCode.UNAVAILABLE, "the scheduler closed the session")
        except grpc.aio.AioRpcError as e:
            failure = RequestFailed(e.code(), e.details() or "")
        if self._call is call:
            log.warning(
                "scheduler session ended (%s); failing %d open requests", failure, len(self._queues)
            )
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()
            self._call = self._outbox = None
            self._tasks = []
            self._fail_open_requests(failure)

    def _fail_open_requests(self, failure: RequestFailed) -> None:
        queues, self._queues = self._queues, {}
        self._events = {}
        for queue in queues.values():
            queue.put_nowait(failure)
