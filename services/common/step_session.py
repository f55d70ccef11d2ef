"""The executor's step session: the one client that may drive an executor (Step, Reset) at a time.

The scheduler opens it (Executor.OpenSession, a server stream) when it connects to its executor and
again when it reconnects; opening drops the executor's request state. Every Step and Reset carries the
session's id and is refused with FAILED_PRECONDITION otherwise, before a step takes a place in the step
order: another client, even one holding the inter-service token, can neither write KV slots that the
scheduler's prefix cache trusts nor hold the scheduler's steps back with a rogue step_id. The session
lives as long as its stream, so a scheduler that dies (its connection closes) frees it for the next one.

Server side: StepSessions (the executor and the scheduler's fake executor, torch-free). Client side:
ExecutorSession (asyncio; the scheduler) and BlockingExecutorSession (benchmarks, tests).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from radixserve.common.grpc_util import open_bidi
from radixserve.common.ordered_stream import OrderedExchange, answer_in_order
from radixserve.common.step_order import StepOrder
from radixserve.v1 import executor_pb2

log = logging.getLogger("radixserve.step_session")

# How long the executor may take to drop its request state and answer OpenSession.
OPEN_TIMEOUT_S = 5.0


class StepSession:
    """One live session: its id and its own step order (a new session starts the order afresh)."""

    def __init__(self, order_timeout_s: float | None = None):
        self.id = secrets.token_hex(16)
        self.order = StepOrder() if order_timeout_s is None else StepOrder(order_timeout_s)
        self.replaced = asyncio.Event()


class StepSessions:
    """The executor's side: which session is live, and the OpenSession, Step and Reset checks."""

    def __init__(self, order_timeout_s: float | None = None):
        self.order_timeout_s = order_timeout_s
        self.current: StepSession | None = None

    def get(self, session_id: str) -> StepSession | None:
        """The live session if session_id is its id, else None."""
        current = self.current
        if (
            current is None
            or not session_id
            or not hmac.compare_digest(session_id.encode(), current.id.encode())
        ):
            return None
        return current

    def refusal(self) -> str:
        if self.current is None:
            return "no step session is open: Step and Reset need one (Executor.OpenSession)"
        return (
            "not the executor's step session: another client (its scheduler) drives this executor"
        )

    async def admit(self, session_id: str, context: grpc.aio.ServicerContext) -> StepSession:
        """The live session of a Step or Reset call; aborts the call with FAILED_PRECONDITION otherwise."""
        session = self.get(session_id)
        if session is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.refusal())
        return session

    async def wait_turn(
        self, request: executor_pb2.ExecutorStepRequest, context: grpc.aio.ServicerContext
    ) -> StepSession:
        """Admit a step (refused before it enters the step order unless it is the live session's), then wait
        for its turn in that session's order; refused too if its session was replaced meanwhile. The caller
        calls session.order.done(step_id) once the step is launched."""
        session = await self.admit(request.session_id, context)
        await session.order.wait_turn(request.step_id)
        if self.current is not session:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the step session ended while the step waited for its turn",
            )
        return session

    async def open(
        self,
        request: executor_pb2.ExecutorOpenSessionRequest,
        context: grpc.aio.ServicerContext,
        reset: Callable[[], Awaitable[int]],
    ) -> AsyncIterator[executor_pb2.ExecutorSessionEvent]:
        """The OpenSession handler: reset() drops the request state (returns how many requests it dropped)."""
        live = self.current
        if live is not None:
            takes_over = (
                bool(request.replaces_session_id) and self.get(request.replaces_session_id) is live
            )
            if not takes_over:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "another client holds this executor's step session (its scheduler); "
                    "one session at a time",
                )
            live.replaced.set()
        session = StepSession(self.order_timeout_s)
        self.current = session
        try:
            dropped = await reset()
            if self.current is not session:
                return
            log.info(
                "step session opened (%d requests dropped)%s",
                dropped,
                ", replacing the previous one" if live is not None else "",
            )
            yield executor_pb2.ExecutorSessionEvent(session_id=session.id, dropped=dropped)
            await session.replaced.wait()
            await context.abort(
                grpc.StatusCode.ABORTED, "the step session was replaced by a new one"
            )
        finally:
            if self.current is session:
                self.current = None
                log.info("step session closed (its client went away)")


class StepsOverStream:
    """Executor.Steps for a servicer that has Step: each streamed request goes through self.Step (so a
    subclass's Step, e.g. a test's paced one, serves the stream too), answered in order."""

    async def Steps(self, request_iterator, context):
        async for answer in answer_in_order(self.Step, request_iterator, context):
            yield answer


class SessionRefused(RuntimeError):
    """The executor did not open a session: another client holds it, or it did not answer in time."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class ExecutorSession:
    """The scheduler's hold on its executor's step session (asyncio). `live` turns False when the stream
    ends (the executor went away or replaced it); on_end is then called once."""

    def __init__(self, call, session_id: str, stub, on_end: Callable[[], None] | None = None):
        self.call = call
        self.id = session_id
        self.end_reason: str | None = None
        self._on_end = on_end
        self._watch = asyncio.create_task(self._wait_end(), name="executor-session")
        # The session's steps go over one Executor.Steps stream of the executor's stub.
        self._steps = OrderedExchange(lambda: open_bidi(stub.Steps))

    async def send_step(self, msg: executor_pb2.ExecutorStepRequest) -> asyncio.Future:
        """Stamp msg with the session's id and send it on the session's step stream; returns a future
        of its ExecutorStepResponse (grpc.aio.AioRpcError when the stream fails: await it with
        wait_step)."""
        msg.session_id = self.id
        return await self._steps.send(msg)

    async def wait_step(self, future: asyncio.Future, timeout: float | None):
        """The answer of send_step; DEADLINE_EXCEEDED (the stream closed) when none comes in time."""
        return await self._steps.wait(future, timeout)

    @classmethod
    async def open(
        cls,
        stub,
        replaces: str = "",
        on_end: Callable[[], None] | None = None,
        timeout: float = OPEN_TIMEOUT_S,
    ) -> "ExecutorSession":
        """Open the session (replacing this client's previous one, `replaces`); SessionRefused when the
        executor refuses or does not answer within timeout."""
        call = stub.OpenSession(
            executor_pb2.ExecutorOpenSessionRequest(replaces_session_id=replaces),
            wait_for_ready=True,
        )
        try:
            first = await asyncio.wait_for(call.read(), timeout)
        except asyncio.TimeoutError:
            call.cancel()
            raise SessionRefused(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g}s"
            ) from None
        except grpc.aio.AioRpcError as e:
            raise SessionRefused(e.code(), e.details() or "") from None
        if first is grpc.aio.EOF:
            raise SessionRefused(
                grpc.StatusCode.UNAVAILABLE, "the executor ended the session at once"
            )
        return cls(call, first.session_id, stub, on_end)

    @property
    def live(self) -> bool:
        return self.end_reason is None

    async def _wait_end(self) -> None:
        try:
            await self.call.read()  # nothing more comes until the stream ends
            reason = "the executor ended the step session"
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            reason = "closed"
        self.end_reason = reason
        if self._on_end is not None:
            self._on_end()

    def close(self) -> None:
        """End the session (the executor frees it at once)."""
        self._on_end = None
        if self.end_reason is None:
            self.end_reason = "closed"
        self.call.cancel()
        self._watch.cancel()
        self._steps.close()


class BlockingExecutorSession:
    """A step session for a blocking client (grpc.Channel): `radixserve bench one-batch --over-grpc`, tests.
    Use as a context manager, or close() it; stamp() puts its id on a Step or Reset request."""

    def __init__(self, stub, timeout: float = OPEN_TIMEOUT_S):
        self.call = stub.OpenSession(executor_pb2.ExecutorOpenSessionRequest(), timeout=None)
        try:
            first = _first_message(self.call, timeout)
        except grpc.RpcError as e:
            self.call.cancel()
            raise SessionRefused(e.code(), e.details() or "") from None
        self.id = first.session_id

    def stamp(self, msg):
        msg.session_id = self.id
        return msg

    def close(self) -> None:
        self.call.cancel()

    def __enter__(self) -> "BlockingExecutorSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_message(call, timeout: float):
    """next(call), cancelling the call when nothing comes within timeout."""
    timer = threading.Timer(timeout, call.cancel)
    timer.start()
    try:
        return next(call)
    except StopIteration:
        raise SessionRefused(
            grpc.StatusCode.UNAVAILABLE, "the executor ended the session at once"
        ) from None
    finally:
        timer.cancel()
