"""One Session stream: many requests of one client multiplexed over a single gRPC stream.

The step loop delivers events synchronously; a session collects them and sends one
SchedulerSessionEvents per event-loop turn, i.e. one message per step for all of its requests. A
gateway streaming hundreds of requests then receives one message per step instead of one per
request per step, which is what keeps gRPC off the critical path at high concurrency.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from radixserve.v1 import scheduler_pb2

from radixserve.scheduler.convert import event_fields
from radixserve.scheduler.request import Request, RequestEvent
from radixserve.scheduler.runtime import SchedulerRuntime, StepFailure

log = logging.getLogger("radixserve.scheduler")


class Rejected(Exception):
    """A request refused at submission, with the gRPC status it gets."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# Validates a generate action and builds its core Request, or raises Rejected.
Prepare = Callable[[scheduler_pb2.SchedulerGenerateRequest], Awaitable[Request]]


class Session:
    def __init__(self, runtime: SchedulerRuntime, prepare: Prepare):
        self.runtime = runtime
        self.prepare = prepare
        self.live: dict[str, tuple[Request, Callable]] = {}
        self.starting: dict[str, asyncio.Task] = {}
        self.pending = scheduler_pb2.SchedulerSessionEvents()
        self.pending_by_id: dict[str, scheduler_pb2.SchedulerGenerateResponse] = {}
        self.outbox: asyncio.Queue[scheduler_pb2.SchedulerSessionEvents | None] = asyncio.Queue()
        self.flush_scheduled = False
        self.input_closed = False

    async def read(self, actions: AsyncIterator[scheduler_pb2.SchedulerSessionRequest]) -> None:
        async for action in actions:
            kind = action.WhichOneof("action")
            if kind == "generate":
                self._start(action.generate)
            elif kind == "abort":
                self._abort(action.abort)
        self.input_closed = True
        self._end_if_done()

    def close(self) -> None:
        """The stream is gone: abort every request still running or starting."""
        for task in self.starting.values():
            task.cancel()
        for req, deliver in list(self.live.values()):
            self.runtime.detach(req, deliver, abort=True)
        self.live.clear()

    # ---- actions ----

    def _start(self, msg: scheduler_pb2.SchedulerGenerateRequest) -> None:
        rid = msg.request_id
        if not rid:
            self._error(rid, grpc.StatusCode.INVALID_ARGUMENT, "request_id is required on a session")
        elif rid in self.live or rid in self.starting:
            self._error(rid, grpc.StatusCode.ALREADY_EXISTS, f"request {rid} is already running")
        else:
            self.starting[rid] = asyncio.create_task(self._submit(rid, msg))

    async def _submit(self, rid: str, msg: scheduler_pb2.SchedulerGenerateRequest) -> None:
        try:
            req = await self.prepare(msg)
        except Rejected as e:
            self._error(rid, e.code, e.message)
            return
        except Exception as e:  # a bug in validation must not kill the whole session
            log.exception("preparing request %s failed", rid)
            self._error(rid, grpc.StatusCode.INTERNAL, f"scheduler error: {e}")
            return
        finally:
            self.starting.pop(rid, None)
        deliver = functools.partial(self._deliver, rid)
        self.live[rid] = (req, deliver)
        self.runtime.submit(req, deliver)

    def _abort(self, msg: scheduler_pb2.SchedulerAbortRequest) -> None:
        ids = list(self.live) + list(self.starting) if msg.abort_all else list(msg.request_ids)
        for rid in ids:
            task = self.starting.pop(rid, None)
            if task is not None:
                task.cancel()
                self._error(rid, grpc.StatusCode.CANCELLED, "aborted before it started")
        self.runtime.abort([rid for rid in ids if rid in self.live], abort_all=False)

    # ---- events out ----

    def _deliver(self, rid: str, event: RequestEvent | StepFailure) -> None:
        if isinstance(event, StepFailure):
            self._forget(rid)
            self._error(rid, grpc.StatusCode.UNAVAILABLE, event.message)
            return
        earlier = self.pending_by_id.get(rid)
        if earlier is None:
            self.pending_by_id[rid] = self.pending.events.add(**event_fields(event))
        else:  # two steps finished within one event-loop turn: one event per request still
            merge_into(earlier, event)
        if event.finished:
            self._forget(rid)
        self._schedule_flush()

    def _forget(self, rid: str) -> None:
        entry = self.live.pop(rid, None)
        if entry is not None:
            self.runtime.detach(*entry, abort=False)

    def _error(self, rid: str, code: grpc.StatusCode, message: str) -> None:
        self.pending.errors.add(request_id=rid, code=code.value[0], message=message)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        self.outbox.put_nowait(self.pending)
        self.pending = scheduler_pb2.SchedulerSessionEvents()
        self.pending_by_id = {}
        self._end_if_done()

    def _end_if_done(self) -> None:
        if self.input_closed and not self.live and not self.starting and not self.flush_scheduled:
            self.outbox.put_nowait(None)


def merge_into(earlier: scheduler_pb2.SchedulerGenerateResponse, later: RequestEvent) -> None:
    """Fold a request's later event into its earlier unsent one."""
    fields = event_fields(later)
    earlier.token_ids.extend(fields["token_ids"])
    earlier.logprobs.extend(fields["logprobs"])
    earlier.finish_reason = fields["finish_reason"]
    earlier.matched_stop_token_id = fields["matched_stop_token_id"]
    earlier.usage.CopyFrom(fields["usage"])
