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
# Raises Rejected unless the queue has room for these requests (--max-queued-requests) and they may be
# queued now (their LoRA adapters are still loaded); nothing is awaited between it and queueing them.
CheckRoom = Callable[[int, list[Request]], None]


class _Starting:
    """The requests of one generate or generate_group action while they are prepared (validation,
    grammar compilation); ids loses those aborted meanwhile."""

    def __init__(self, ids):
        self.ids: set[str] = set(ids)
        self.task: asyncio.Task | None = None


class Session:
    def __init__(
        self, runtime: SchedulerRuntime, prepare: Prepare, check_room: CheckRoom | None = None
    ):
        """prepare: validation of one request; check_room: the queue limit, applied to each action's
        requests together right before they are queued (prepare then must not check it)."""
        self.runtime = runtime
        self.prepare = prepare
        self.check_room = check_room
        self.live: dict[str, tuple[Request, Callable]] = {}
        self.starting: dict[str, _Starting] = {}
        self.pending = scheduler_pb2.SchedulerSessionEvents()
        self.pending_by_id: dict[str, scheduler_pb2.SchedulerGenerateResponse] = {}
        self.outbox: asyncio.Queue[scheduler_pb2.SchedulerSessionEvents | None] = asyncio.Queue()
        self.flush_scheduled = False
        self.input_closed = False

    async def read(self, actions: AsyncIterator[scheduler_pb2.SchedulerSessionRequest]) -> None:
        async for action in actions:
            kind = action.WhichOneof("action")
            if kind == "generate":
                self._start([action.generate])
            elif kind == "generate_group":
                self._start(list(action.generate_group.requests))
            elif kind == "abort":
                self._abort(action.abort)
        self.input_closed = True
        self._end_if_done()

    def close(self) -> None:
        """The stream is gone: abort every request still running or starting (in one batch)."""
        for task in {
            id(s.task): s.task for s in self.starting.values() if s.task is not None
        }.values():
            task.cancel()
        entries = list(self.live.values())
        self.live.clear()
        self.runtime.detach_all(entries)

    # ---- actions ----

    def _start(self, msgs: list[scheduler_pb2.SchedulerGenerateRequest]) -> None:
        """Prepare, then queue, one request or a group (all or none: one that fails fails them all)."""
        if not msgs:
            return
        ids = [msg.request_id for msg in msgs]
        problem = None
        seen: set[str] = set()
        for rid in ids:
            if not rid:
                problem = (grpc.StatusCode.INVALID_ARGUMENT, "request_id is required on a session")
            elif rid in self.live or rid in self.starting or rid in seen:
                problem = (grpc.StatusCode.ALREADY_EXISTS, f"request {rid} is already running")
            if problem:
                break
            seen.add(rid)
        if problem:
            for rid in dict.fromkeys(ids):
                self._error(rid, *problem)
            return
        start = _Starting(ids)
        for rid in ids:
            self.starting[rid] = start
        start.task = asyncio.create_task(self._submit(start, msgs))

    async def _submit(
        self, start: _Starting, msgs: list[scheduler_pb2.SchedulerGenerateRequest]
    ) -> None:
        try:
            reqs = [await self.prepare(msg) for msg in msgs if msg.request_id in start.ids]
            reqs = [req for req in reqs if req.request_id in start.ids]  # not aborted meanwhile
            clash = next(
                (r.request_id for r in reqs if r.request_id in self.runtime.core.requests), None
            )
            if clash is not None:
                raise Rejected(
                    grpc.StatusCode.ALREADY_EXISTS, f"request {clash} is already running"
                )
            if reqs and self.check_room is not None:
                self.check_room(len(reqs), reqs)
        except Rejected as e:
            for rid in start.ids:
                self._error(rid, e.code, e.message)
            return
        except Exception as e:  # a bug in validation must not kill the whole session
            log.exception("preparing request(s) %s failed", ", ".join(sorted(start.ids)[:3]))
            for rid in start.ids:
                self._error(rid, grpc.StatusCode.INTERNAL, f"scheduler error: {e}")
            return
        finally:
            for rid in start.ids:
                if self.starting.get(rid) is start:
                    del self.starting[rid]
        for req in reqs:  # no await since the room check: they are queued together
            deliver = functools.partial(self._deliver, req.request_id)
            self.live[req.request_id] = (req, deliver)
            self.runtime.submit(req, deliver)

    def _abort(self, msg: scheduler_pb2.SchedulerAbortRequest) -> None:
        """One batch however many ids: those still starting get CANCELLED, the queued and running ones
        leave the core at once (aborting k of them costs O(k + queue length))."""
        ids = list(self.live) + list(self.starting) if msg.abort_all else list(msg.request_ids)
        for rid in ids:
            start = self.starting.pop(rid, None)
            if start is not None:
                start.ids.discard(rid)
                if not start.ids and start.task is not None:
                    start.task.cancel()
                self._error(rid, grpc.StatusCode.CANCELLED, "aborted before it started")
        self.runtime.abort([rid for rid in ids if rid in self.live], abort_all=False)

    # ---- events out ----

    def _deliver(self, rid: str, event: RequestEvent | StepFailure) -> None:
        if isinstance(event, StepFailure):
            self._forget(rid)
            self._error(rid, grpc.StatusCode.UNAVAILABLE, event.message, event.stage)
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

    def _error(
        self,
        rid: str,
        code: grpc.StatusCode,
        message: str,
        stage: int = scheduler_pb2.FAILED_STAGE_SCHEDULER,
    ) -> None:
        self.pending.errors.add(
            request_id=rid, code=code.value[0], message=message, failed_stage=stage
        )
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
    earlier.prompt_logprobs.extend(fields["prompt_logprobs"])
    earlier.finish_reason = fields["finish_reason"]
    earlier.matched_stop_token_id = fields["matched_stop_token_id"]
    earlier.usage.CopyFrom(fields["usage"])
