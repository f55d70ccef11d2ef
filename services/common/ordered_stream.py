"""A unary RPC carried over one long-lived bidirectional stream: requests in, answers out in order.

Why: on this stack's grpc.aio a unary call costs ~2x the CPU of a write and a read on an open stream
(per-call HTTP/2 stream setup, metadata, the token interceptor; scripts/bench_grpc_costs.py), and
Executor.Step and Detokenizer.Decode are called once per generated token. Their stream forms
(Executor.Steps, Detokenizer.DecodeStream) are defined by the unary method: the server answers each
request exactly as the unary handler would (answer_in_order) and an error status ends the stream as
it would end the call; the client (OrderedExchange) matches answers to requests by order.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc


async def answer_in_order(
    handler: Callable[[object, grpc.aio.ServicerContext], Awaitable[object]],
    requests: AsyncIterator,
    context: grpc.aio.ServicerContext,
) -> AsyncIterator:
    """Server side: each request handled by the unary `handler` (concurrently, as separate calls would
    be, so a step that arrives while the previous one runs is taken at once), answers yielded in
    request order. A handler that aborts ends the stream with its status; the handlers still running
    are cancelled when the stream ends."""
    handling: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()

    async def take() -> None:
        try:
            async for request in requests:
                handling.put_nowait(asyncio.ensure_future(handler(request, context)))
        finally:
            handling.put_nowait(None)  # the client half-closed (or went away)

    reader = asyncio.create_task(take())
    try:
        while (task := await handling.get()) is not None:
            yield await task
        await reader  # re-raise a failed read
    finally:
        reader.cancel()
        while not handling.empty():
            task = handling.get_nowait()
            if task is not None:
                task.cancel()


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class _Stream:
    """One opened stream and the futures of its unanswered requests, oldest first."""

    def __init__(self, call: grpc.aio.StreamStreamCall):
        self.call = call
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.reader: asyncio.Task | None = None

    def fail(self, error: BaseException) -> None:
        self.call.cancel()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)


class OrderedExchange:
    """Client side: send() writes a request on the stream (opened on first use by open_call, e.g.
    `lambda: stub.Steps()`) and returns a future of its answer. When the stream fails every pending
    future gets the error (grpc.aio.AioRpcError, as the unary call would raise) and the next send()
    opens a new stream. asyncio; one event loop."""

    def __init__(self, open_call: Callable[[], grpc.aio.StreamStreamCall]):
        self._open_call = open_call
        self._stream: _Stream | None = None
        self._write_lock = asyncio.Lock()  # grpc.aio takes one write at a time
        self.streams_opened = 0  # for tests and debugging

    @property
    def pending(self) -> int:
        return len(self._stream.pending) if self._stream is not None else 0

    async def send(self, request) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        async with self._write_lock:
            if self._stream is None:
                self._stream = _Stream(self._open_call())
                self._stream.reader = asyncio.create_task(self._read(self._stream))
                self.streams_opened += 1
            stream = self._stream
            stream.pending.append(future)
            try:
                await stream.call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                # The stream has ended: its reader fails the pending futures with the stream's status
                # (this one too), unless it has done so already.
                if not future.done() and self._stream is not stream:
                    future.set_exception(
                        e
                        if isinstance(e, grpc.aio.AioRpcError)
                        else _rpc_error(grpc.StatusCode.UNAVAILABLE, str(e))
                    )
        return future

    async def exchange(self, request, timeout: float | None = None):
        """send() and wait for the answer (see wait)."""
        return await self.wait(await self.send(request), timeout)

    async def wait(self, future: asyncio.Future, timeout: float | None):
        """The answer of a send(); with timeout, a stream that does not answer in time is closed (its
        pending requests fail) and DEADLINE_EXCEEDED raised."""
        if timeout is None or future.done():
            return await future
        # A timer rather than asyncio.wait_for: no task or shield per exchange on this hot path.
        expiry = asyncio.get_running_loop().call_later(
            max(0.0, timeout), self._expire, future, timeout
        )
        try:
            return await future
        finally:
            expiry.cancel()

    def _expire(self, future: asyncio.Future, timeout: float) -> None:
        """No answer in time: close the stream, failing every pending request with DEADLINE_EXCEEDED."""
        if future.done():
            return
        error = _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g}s")
        stream = self._stream
        if stream is not None and future in stream.pending:
            self.close(error)
        else:  # not on the open stream (it failed meanwhile): fail this one alone
            future.set_exception(error)

    async def _read(self, stream: _Stream) -> None:
        try:
            while True:
                answer = await stream.call.read()
                if answer is grpc.aio.EOF:
                    error = _rpc_error(
                        grpc.StatusCode.UNAVAILABLE, "the stream ended with requests unanswered"
                    )
                    break
                if not stream.pending:
                    error = _rpc_error(grpc.StatusCode.INTERNAL, "an answer to no request")
                    break
                future = stream.pending.popleft()
                if not future.done():
                    future.set_result(answer)
        except grpc.aio.AioRpcError as e:
            error = e
        except asyncio.CancelledError:
            error = _rpc_error(grpc.StatusCode.CANCELLED, "the stream was closed")
        if self._stream is stream:
            self._stream = None
        stream.fail(error)

    def close(self, error: BaseException | None = None) -> None:
        """Cancel the stream; its pending requests fail with error (CANCELLED when None)."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        stream.fail(error or _rpc_error(grpc.StatusCode.CANCELLED, "the stream was closed"))
        if stream.reader is not None:
            stream.reader.cancel()
