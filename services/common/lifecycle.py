"""A service process's life: SIGTERM/SIGINT caught from its event loop's first moment, a started
grpc.aio server served until one arrives, then stopped gracefully (every gRPC service)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import weakref
from typing import Awaitable, Callable, TypeVar

import grpc

from radixserve.common import tracing

SHUTDOWN_GRACE_S = 5.0

Args = TypeVar("Args")
T = TypeVar("T")
# The stop event of each loop run_service started: set by SIGTERM/SIGINT.
_stop_events: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event]" = (
    weakref.WeakKeyDictionary()
)


def _stop_event() -> asyncio.Event:
    """This loop's stop event; the first call installs the signal handlers that set it."""
    loop = asyncio.get_running_loop()
    stop = _stop_events.get(loop)
    if stop is None:
        stop = _stop_events[loop] = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                loop.add_signal_handler(sig, stop.set)
    return stop


def run_service(serve: Callable[[Args], Awaitable[None]], args: Args) -> int:
    """asyncio.run(serve(args)) with the signals caught before serve starts: a stop that arrives
    while the service loads, or right after it reports ready, is a clean one (exit code 0).
    Tracing (when configured) starts before serve and is flushed after it."""

    async def main() -> None:
        _stop_event()
        await serve(args)

    with traced_process(args):
        run_event_loop(main())
    return 0


@contextlib.contextmanager
def traced_process(args):
    """Tracing for this service process per its flags (--otlp-traces-endpoint), flushed at exit."""
    tracing.setup(args.service, args.otlp_traces_endpoint, args.trace_sample_ratio)
    try:
        yield
    finally:
        tracing.shutdown()


def run_event_loop(main: Awaitable[T]) -> T:
    """asyncio.run on uvloop when it is installed: its loop cuts the per-message cost of every
    gRPC stream and HTTP response a service handles."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def unless_stopped(awaitable: Awaitable[T]) -> T | None:
    """awaitable's result, or None (it is cancelled) when SIGTERM/SIGINT arrives first: a service
    still waiting for its peers at start stops at once."""
    stop = _stop_event()
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def wait_until_signalled(server: grpc.aio.Server) -> None:
    """Return on SIGTERM/SIGINT or when the server terminates; the caller then shuts down."""
    stop = _stop_event()
    waiter = asyncio.ensure_future(server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()  # the waiter finishes by itself once the server is stopped


async def run_until_signalled(server: grpc.aio.Server) -> None:
    """Serve until SIGTERM/SIGINT, then stop the server gracefully."""
    await wait_until_signalled(server)
    await server.stop(SHUTDOWN_GRACE_S)
