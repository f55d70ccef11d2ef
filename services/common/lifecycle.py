"""Run a started grpc.aio server until SIGTERM/SIGINT, then stop it gracefully."""
from __future__ import annotations

import asyncio
import contextlib
import signal

import grpc

SHUTDOWN_GRACE_S = 5.0


async def run_until_signalled(server: grpc.aio.Server) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    await server.stop(SHUTDOWN_GRACE_S)
    await waiter
