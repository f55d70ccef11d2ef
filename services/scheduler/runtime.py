"""The step loop: plan with the core, run the plan on the executor, route events to streams.

With overlap (the default) step N+1 is planned and sent while step N runs, so the executor does not
sit idle during the round trip and the scheduler's own work.

When a step fails (the executor died, hung past the step deadline, or raised), the admitted requests
fail (their KV is gone) and the queued ones stay queued; the loop waits until the executor answers
again (a restarted one once it has loaded), resets it and goes on. A bug in the scheduler itself
fails every request instead.

The scheduler drives its executor through a step session (common/step_session.py), opened when it
connects and again after every failure: the executor refuses steps from any other client. A session
that ends under it (the executor went away) is handled as a failed step, also while idle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import grpc

from radixserve.v1 import executor_pb2, executor_pb2_grpc, scheduler_pb2

from radixserve.common.step_session import ExecutorSession, SessionRefused
from radixserve.common.step_convert import output_from_proto, step_to_proto
from radixserve.scheduler.core import Scheduler
from radixserve.common.step import StepInput
from radixserve.scheduler.request import Request, RequestEvent

log = logging.getLogger("radixserve.scheduler")

EXECUTOR_RESET_TIMEOUT_S = 5.0
EXECUTOR_PROBE_TIMEOUT_S = 5.0
EXECUTOR_RETRY_S = (
    0.2  # after a refused or failed attempt; the probe itself waits for the channel to connect
)
EXECUTOR_WAIT_LOG_EVERY_S = 10.0
# Past the executor's --watchdog-timeout, which restarts a hung executor first; the deadline covers
# an executor that hangs without its watchdog firing.
STEP_DEADLINE_MARGIN_S = 30.0
# Steps sent before the oldest one's result is processed, when overlapping.
OVERLAP_DEPTH = 2


def step_deadline(watchdog_timeout: float) -> float | None:
    """Seconds a step may take to be answered on the Steps stream (None: no watchdog, no deadline);
    a step sent with overlap also waits for the one before it."""
    if watchdog_timeout <= 0:
        return None
    return OVERLAP_DEPTH * watchdog_timeout + min(STEP_DEADLINE_MARGIN_S, watchdog_timeout)


class ExecutorChanged(RuntimeError):
    """The executor came back with another model or a smaller KV pool: the scheduler cannot go on."""


class StepFailure:
    """Delivered to a request's receiver when its step failed; its stream ends with UNAVAILABLE.
    stage: which one failed it, a scheduler_pb2.FailedStage."""

    def __init__(self, message: str, stage: int):
        self.message = message
        self.stage = stage


# Receives one request's events, in order, synchronously from the step loop.
Deliver = Callable[[RequestEvent | StepFailure], None]


class RuntimeObserver:
    """Telemetry hooks on the step loop (metrics, tracing), called synchronously; override what you need."""

    def submitted(self, req: Request) -> None:
        """req was queued (req.arrival_time is set)."""

    def sent(self, plan: StepInput) -> None:
        """plan went to the executor."""

    def completed(self, plan: StepInput, seconds: float) -> None:
        """plan's result came back, seconds after it was sent."""

    def dispatched(self, events: list[RequestEvent]) -> None:
        """Events of a step or of aborts (finished events end their requests)."""

    def failed(self, request_ids: list[str], message: str) -> None:
        """These requests ended with a step failure."""


class SchedulerRuntime:
    def __init__(
        self,
        core: Scheduler,
        executor: executor_pb2_grpc.ExecutorStub,
        overlap: bool = True,
        step_timeout: float | None = None,
        model: executor_pb2.ExecutorModelInfo | None = None,
    ):
        self.core = core
        self.executor = executor
        self.overlap = overlap
        self.step_timeout = step_timeout  # deadline of each step's answer; None: none
        self.model = model  # what the executor served at start; a restarted one must match it
        # False from a failed step until the executor answers again (GetInfo reports it).
        self.executor_available = True
        self.receivers: dict[str, Deliver] = {}
        self.observers: list[RuntimeObserver] = []
        self.wake = asyncio.Event()
        self.steps = 0
        self.inflight: deque[tuple[StepInput, grpc.aio.UnaryUnaryCall, float]] = deque()
        # The executor orders steps from the first one it sees (after a start or Reset), so the
        # first step goes alone: a second one arriving before it would set the wrong base.
        self.executor_synced = False
        self.session: ExecutorSession | None = None  # the executor's step session (connect)
        self.model_now = model  # the executor's GetModelInfo at the last (re)connection
        # Awaited with it after a reconnection, before steps resume.
        self.after_reconnect: list[Callable[[executor_pb2.ExecutorModelInfo], Awaitable[None]]] = []

    # ---- called by the gRPC handlers ---------------------------------------------------------

    def submit(self, req: Request, deliver: Deliver) -> None:
        """Queue a validated request; each of its events (or a StepFailure) is passed to deliver."""
        req.arrival_time = time.monotonic()
        self.core.add_request(req)
        self.receivers[req.request_id] = deliver
        for observer in self.observers:
            observer.submitted(req)
        self.wake.set()

    def detach(self, req: Request, deliver: Deliver, abort: bool) -> None:
        """The stream of req ended; abort the request if it was still live (client went away)."""
        if self.receivers.get(req.request_id) is deliver:
            del self.receivers[req.request_id]
        if abort and self.core.requests.get(req.request_id) is req:
            event = self.core.abort(req.request_id)
            log.info("request %s cancelled by the client", req.request_id)
            for observer in self.observers:
                observer.dispatched([event])
            self.wake.set()

    def detach_all(self, entries: list[tuple[Request, Deliver]]) -> int:
        """detach(abort=True) for many requests at once (a session's stream is gone): one batch abort,
        so the queue is rebuilt once however many of them wait. Returns how many were still live."""
        live = []
        for req, deliver in entries:
            if self.receivers.get(req.request_id) is deliver:
                del self.receivers[req.request_id]
            if self.core.requests.get(req.request_id) is req:
                live.append(req.request_id)
        if live:
            events = self.core.abort_many(live)
            log.info(
                "%d requests cancelled by the client (%s%s)",
                len(events),
                ", ".join(live[:3]),
                ", ..." if len(live) > 3 else "",
            )
            for observer in self.observers:
                observer.dispatched(events)
            self.wake.set()
        return len(live)

    def abort(self, request_ids: list[str], abort_all: bool) -> int:
        """Abort requests by id (unknown ones are skipped), in one batch: O(ids + queue length)."""
        events = self.core.abort_all() if abort_all else self.core.abort_many(request_ids)
        self._dispatch(events)
        self.wake.set()
        return len(events)

    # ---- the loop ----------------------------------------------------------------------------

    def _depth(self) -> int:
        overlap = (
            self.overlap and self.executor_synced and not self.core.needs_result_before_next_step()
        )
        return OVERLAP_DEPTH if overlap else 1

    async def run(self) -> None:
        """Send steps while fewer than _depth() are in flight and the core has one to plan; else
        process the oldest step's result; with nothing in flight and nothing to plan, sleep."""
        leak_checked = True
        if self.session is None:
            await self.connect()
        while True:
            try:
                if not self.session.live and not self.inflight:
                    await self._recover(
                        f"the executor's step session ended ({self.session.end_reason})",
                        keep_waiting=True,
                        stage=scheduler_pb2.FAILED_STAGE_EXECUTOR,
                    )
                    continue
                plan = self.core.schedule() if len(self.inflight) < self._depth() else None
                if plan is not None:
                    leak_checked = False
                    answer = await self.session.send_step(step_to_proto(plan))
                    self.inflight.append((plan, answer, time.monotonic()))
                    for observer in self.observers:
                        observer.sent(plan)
                elif self.inflight:
                    await self._finish_oldest_step()
                else:
                    if not leak_checked:
                        leak_checked = True
                        error = self.core.check_leak()
                        if error:
                            log.error(error)
                    self.wake.clear()
                    await self.wake.wait()
            except asyncio.CancelledError:
                self._cancel_inflight()
                self.session.close()
                raise
            except ExecutorChanged:
                raise  # fatal: the process exits and is restarted
            except Exception as e:  # a bug must not leave every stream hanging
                log.exception("scheduler step failed")
                await self._recover(
                    f"scheduler error: {e}",
                    keep_waiting=False,
                    stage=scheduler_pb2.FAILED_STAGE_SCHEDULER,
                )

    async def _finish_oldest_step(self) -> None:
        plan, answer, sent_at = self.inflight[0]
        try:
            timeout = (
                None
                if self.step_timeout is None
                else sent_at + self.step_timeout - time.monotonic()
            )
            resp = await self.session.wait_step(answer, timeout)
        except grpc.aio.AioRpcError as e:
            await self._recover(
                f"executor step failed: {e.code().name}: {e.details()}",
                keep_waiting=True,
                stage=scheduler_pb2.FAILED_STAGE_EXECUTOR,
            )
            return
        self.inflight.popleft()
        self.executor_synced = True
        self.steps += 1
        for observer in self.observers:
            observer.completed(plan, time.monotonic() - sent_at)
        out = output_from_proto(resp)
        self._dispatch(self.core.update(plan, out.outputs, out.prompt_logprobs))

    def _cancel_inflight(self) -> None:
        """Forget the steps in flight; their results, should they come, are ignored."""
        for _, answer, _ in self.inflight:
            answer.cancel()
        self.inflight.clear()

    def _dispatch(self, events: list[RequestEvent]) -> None:
        for observer in self.observers:
            observer.dispatched(events)
        for event in events:
            deliver = self.receivers.get(event.request_id)
            if deliver is not None:
                deliver(event)

    async def _recover(self, message: str, keep_waiting: bool, stage: int) -> None:
        """Fail the admitted requests (and the queued ones unless keep_waiting) as failed by `stage` (a
        scheduler_pb2.FailedStage), drop all KV, and return once the executor answers again and has
        dropped what it still held."""
        self.executor_available = False
        self._cancel_inflight()
        self.executor_synced = False
        failed = self.core.reset(keep_waiting=keep_waiting)
        log.error(
            "%s; failing %d requests, keeping %d queued, dropping all KV",
            message,
            len(failed),
            len(self.core.waiting),
        )
        for observer in self.observers:
            observer.failed(failed, message)
        for rid in failed:
            deliver = self.receivers.get(rid)
            if deliver is not None:
                deliver(StepFailure(message, stage))
        await self._reconnect()
        for hook in self.after_reconnect:  # e.g. LoRA adapters loaded at run time, loaded again
            await hook(self.model_now)
        self.core.executor_was_reset()
        self.executor_available = True
        log.info("executor is back; %d queued requests go on", len(self.core.waiting))

    async def connect(self) -> None:
        """Open the executor's step session; returns once it is open (see _reconnect)."""
        await self._reconnect()

    async def _reconnect(self) -> None:
        """Wait until the executor answers with the model it served before, then open a new step
        session (which drops all its request state: a restarted one holds nothing; a live one drops
        the failed requests). Its step order then starts again from the next step, which goes alone
        (executor_synced is False). While another client holds the session (a scheduler that has not
        quite gone yet), wait for it to end."""
        loop = asyncio.get_running_loop()
        last_log = loop.time()
        refused_before = False
        while True:
            try:
                info = await self.executor.GetModelInfo(
                    executor_pb2.ExecutorModelInfoRequest(),
                    timeout=EXECUTOR_PROBE_TIMEOUT_S,
                    wait_for_ready=True,
                )
                self._check_same_model(info)
                await self._open_session()
                self.model_now = info
                return
            except grpc.aio.AioRpcError as e:
                why = e.code().name
            except SessionRefused as e:
                why = f"step session: {e}"
                if e.code == grpc.StatusCode.FAILED_PRECONDITION and not refused_before:
                    refused_before = True
                    log.warning(
                        "the executor's step session is held by another client (%s); waiting for it to "
                        "end",
                        e.details,
                    )
            if loop.time() - last_log >= EXECUTOR_WAIT_LOG_EVERY_S:
                log.warning(
                    "still waiting for the executor (%s); %d requests queued",
                    why,
                    len(self.core.waiting),
                )
                last_log = loop.time()
            await asyncio.sleep(EXECUTOR_RETRY_S)

    async def _open_session(self) -> None:
        """A new step session in place of this scheduler's previous one (closed first; named in the
        request too, should the executor not have seen it end yet)."""
        replaces = ""
        if self.session is not None:
            replaces = self.session.id
            self.session.close()
        self.session = await ExecutorSession.open(
            self.executor, replaces, on_end=self.wake.set, timeout=EXECUTOR_RESET_TIMEOUT_S
        )

    def _check_same_model(self, info: executor_pb2.ExecutorModelInfo) -> None:
        if self.model is None:
            return
        slots_used = self.core.pool.num_pages * self.core.page_size
        if (info.architecture, info.vocab_size) != (
            self.model.architecture,
            self.model.vocab_size,
        ) or info.kv_slots < slots_used:
            raise ExecutorChanged(
                f"the executor came back with {info.architecture} (vocab {info.vocab_size}, {info.kv_slots} KV "
                f"slots), not {self.model.architecture} (vocab {self.model.vocab_size}, {slots_used} slots used)"
            )
