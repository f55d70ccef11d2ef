"""The gateway process: the OpenAI REST API (uvicorn) and the public gRPC API in one event loop.

SIGTERM (or SIGINT) drains: new HTTP requests get 503 with an OpenAI error body while the listening
socket stays open (see drain.py), the public gRPC server stops taking calls (new ones fail with
UNAVAILABLE, its port closes at once), and the accepted requests of both get up to --shutdown-timeout
to finish. Requests still running then are cut: a stream ends with an error event and `data: [DONE]`,
a request not yet answered gets 503 (see DrainGate.cut). Then the HTTP socket closes (later connections
are refused) and the process exits 0. A second signal stops at once.

HTTP/1.1 is served by uvicorn's httptools protocol with the limits of http_limits.py (request head size,
header count and time, open connections) and --http-keep-alive-timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
import uvicorn

from radixserve.common.args import ServerArgs
from radixserve.common.grpc_security import install_from_args
from radixserve.common.lifecycle import run_event_loop, traced_process
from radixserve.common.log import setup_logging
from radixserve.gateway.app import create_app
from radixserve.gateway.api.drain import DrainGate
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.api.grpc_api import start_grpc_api
from radixserve.gateway.api.http_limits import HttpLimits, protocol_class

log = logging.getLogger("radixserve.gateway")
GRPC_STOP_GRACE_S = 5
HTTP_STOP_GRACE_S = 5  # what uvicorn still gives open connections once it is told to exit
CUT_GRACE_S = 2  # how long requests cut at --shutdown-timeout get to send their last words


class _HttpServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """serve() handles SIGINT/SIGTERM itself, so the gRPC server stops cleanly too."""
        yield


class Gateway:
    """Both front ends over one engine; port 0 in args picks free ports (see http_port, grpc_port)."""

    def __init__(self, args: ServerArgs, engine: Engine | None = None):
        self.args = args
        self.http_limits = HttpLimits.from_args(args)
        self.engine = engine or Engine(args)
        self.app = create_app(args, self.engine)
        self.gate = DrainGate(self.app)
        self.http = _HttpServer(
            uvicorn.Config(
                self.gate,
                host=args.host,
                port=args.port,
                log_level=args.log_level,
                timeout_graceful_shutdown=HTTP_STOP_GRACE_S,
                http=protocol_class(self.http_limits),
                timeout_keep_alive=self.http_limits.keep_alive_timeout,
            )
        )
        self.grpc: grpc.aio.Server | None = None
        self.grpc_port = 0
        self._http_task: asyncio.Task | None = None
        self._drain_task: asyncio.Task | None = None

    @property
    def http_port(self) -> int:
        return self.http.servers[0].sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.grpc, self.grpc_port = await start_grpc_api(
            self.engine, self.args.listen_addr("gateway"), api_key=self.args.api_key
        )
        self._http_task = asyncio.create_task(self.http.serve())
        while not self.http.started:
            if self._http_task.done():
                await self._http_task
                raise RuntimeError(
                    f"the HTTP server did not start on {self.args.host}:{self.args.port}"
                )
            await asyncio.sleep(0.05)
        log.info(
            "gateway ready on http://%s:%d (gRPC API on %s:%d)",
            self.args.host,
            self.http_port,
            self.args.grpc_host,
            self.grpc_port,
        )

    def request_stop(self) -> None:
        """Drain, then stop (SIGTERM/SIGINT); a second call stops at once."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(
                self.drain(self.args.shutdown_timeout)
            )
        else:
            log.warning("stopping now, without waiting for the requests in progress")
            self.http.should_exit = self.http.force_exit = True

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, give the accepted ones up to timeout seconds, then stop serving HTTP."""
        self.gate.close()
        log.info(
            "draining: %d HTTP requests in progress, new ones get 503 (up to %gs)",
            self.gate.active,
            timeout,
        )
        waits = [self.gate.wait_idle(timeout)]
        if self.grpc is not None:
            waits.append(self.grpc.stop(timeout))
        http_idle, *_ = await asyncio.gather(*waits)
        if not http_idle:
            log.warning(
                "%d HTTP requests still running after --shutdown-timeout %gs; cutting them",
                self.gate.active,
                timeout,
            )
            await self.gate.cut(CUT_GRACE_S)
        self.http.should_exit = True

    async def wait(self) -> None:
        await self._http_task

    async def stop(self) -> None:
        self.http.should_exit = True
        if self._drain_task is not None:
            self._drain_task.cancel()
        if self._http_task is not None:
            await asyncio.gather(self._http_task, return_exceptions=True)
        if self.grpc is not None:
            await self.grpc.stop(GRPC_STOP_GRACE_S)
        await self.engine.close()


async def serve(args: ServerArgs) -> None:
    install_from_args(args)
    gateway = Gateway(args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, gateway.request_stop)
    await gateway.start()
    try:
        await gateway.wait()
    finally:
        await gateway.stop()
        log.info("gateway stopped")


def main(args: ServerArgs) -> int:
    setup_logging("gateway", args.log_level)
    with traced_process(args):
        run_event_loop(serve(args))
    return 0
