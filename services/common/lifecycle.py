"""Run a started grpc.aio server until SIGTERM/SIGINT, then stop it gracefully (every service)."""
from __future__ import annotations

import asyncio
import contextlib
import signal

import grpc

SHUTDOWN_GRACE_S = 5.0


async def wait_until_signalled(server: grpc.aio.Server) -> None:
    """Return on SIGTERM/SIGINT or when the server terminates; the caller then shuts down."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()  # the waiter finishes by itself once the server is stopped


async def run_until_signalled(server: grpc.aio.Server) -> None:
    """Serve until SIGTERM/SIGINT, then stop the server gracefully."""
    await wait_until_signalled(server)
    await server.stop(SHUTDOWN_GRACE_S)
