"""The step loop: plan with the core, run the plan on the executor, route events to streams."""
from __future__ import annotations

import asyncio
import logging

import grpc

from radixserve.v1 import executor_pb2, executor_pb2_grpc

from services.scheduler.convert import outputs_from_proto, plan_to_proto
from services.scheduler.core import Scheduler
from services.scheduler.request import Request, RequestEvent

log = logging.getLogger("radixserve.scheduler")

EXECUTOR_RESET_TIMEOUT_S = 5.0


class StepFailure:
    """Put on a request's queue when its step failed; the stream ends with UNAVAILABLE."""

    def __init__(self, message: str):
        self.message = message


class SchedulerRuntime:
    def __init__(self, core: Scheduler, executor: executor_pb2_grpc.ExecutorStub):
        self.core = core
        self.executor = executor
        self.queues: dict[str, asyncio.Queue] = {}
        self.wake = asyncio.Event()
        self.steps = 0

    # ---- called by the gRPC handlers ---------------------------------------------------------

    def submit(self, req: Request) -> asyncio.Queue:
        """Queue a validated request; its events arrive on the returned queue."""
        self.core.add_request(req)
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[req.request_id] = queue
        self.wake.set()
        return queue

    def detach(self, req: Request, queue: asyncio.Queue, abort: bool) -> None:
        """The stream of req ended; abort the request if it was still live (client went away)."""
        if self.queues.get(req.request_id) is queue:
            del self.queues[req.request_id]
        if abort and self.core.requests.get(req.request_id) is req:
            self.core.abort(req.request_id)
            log.info("request %s cancelled by the client", req.request_id)
            self.wake.set()

    def abort(self, request_ids: list[str], abort_all: bool) -> int:
        if abort_all:
            events = self.core.abort_all()
        else:
            events = [ev for rid in request_ids if (ev := self.core.abort(rid)) is not None]
        self._dispatch(events)
        self.wake.set()
        return len(events)

    # ---- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        leak_checked = True
        while True:
            try:
                plan = self.core.schedule()
                if plan is None:
                    if not leak_checked:
                        leak_checked = True
                        error = self.core.check_leak()
                        if error:
                            log.error(error)
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                leak_checked = False
                try:
                    resp = await self.executor.Step(plan_to_proto(plan))
                except grpc.aio.AioRpcError as e:
                    await self._fail_all(f"executor step failed: {e.code().name}: {e.details()}")
                    continue
                self.steps += 1
                self._dispatch(self.core.update(plan, outputs_from_proto(resp)))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not leave every stream hanging
                log.exception("scheduler step failed")
                await self._fail_all(f"scheduler error: {e}")

    def _dispatch(self, events: list[RequestEvent]) -> None:
        for event in events:
            queue = self.queues.get(event.request_id)
            if queue is not None:
                queue.put_nowait(event)

    async def _fail_all(self, message: str) -> None:
        log.error("%s; failing %d requests and dropping all KV", message, len(self.core.requests))
        for rid in self.core.reset():
            queue = self.queues.get(rid)
            if queue is not None:
                queue.put_nowait(StepFailure(message))
        try:
            await self.executor.Reset(executor_pb2.ExecutorResetRequest(),
                                      timeout=EXECUTOR_RESET_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.warning("executor Reset failed too (%s); the next step drops its stale requests",
                        e.code().name)
        else:
            self.core.executor_was_reset()
