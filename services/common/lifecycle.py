"""Run a started grpc.aio server until SIGTERM/SIGINT, then stop it gracefully (every service)."""
from __future__ import annotations

import asyncio
import contextlib
import signal

import grpc

SHUTDOWN_GRACE_S = 5.0


def catch_stop_signals() -> asyncio.Event:
    """From now on SIGTERM/SIGINT set the returned event instead of killing the process. Call it
    before the service reports ready, so that a signal right after that is a clean stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_until_signalled(server: grpc.aio.Server, stop: asyncio.Event | None = None) -> None:
    """Return on SIGTERM/SIGINT (or `stop` set) or when the server terminates; the caller then shuts down."""
    stop = stop or catch_stop_signals()
    waiter = asyncio.ensure_future(server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()  # the waiter finishes by itself once the server is stopped


async def run_until_signalled(server: grpc.aio.Server, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then stop the server gracefully."""
    await wait_until_signalled(server, stop)
    await server.stop(SHUTDOWN_GRACE_S)
