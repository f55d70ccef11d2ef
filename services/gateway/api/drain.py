"""The gateway's drain on SIGTERM: new HTTP requests get 503, accepted ones run to their end.

DrainGate wraps the ASGI app and counts the HTTP requests in progress (a streamed response counts
until its last byte). Once closed it answers every new request 503 with an OpenAI error body and
`Connection: close`, /health included, so that load balancers stop sending traffic here. The
listening socket stays open while the accepted requests drain, so a client gets that clear 503
rather than a refused connection; when they are done, or --shutdown-timeout has passed, uvicorn
closes the socket and later connections are refused.

Requests still running at --shutdown-timeout are cut (cut()): their tasks are cancelled, which aborts
their generations as a client disconnect would, and each gets a proper end instead of a connection torn
mid-chunk: a server-sent event stream ends with an OpenAI-shaped error event and `data: [DONE]`, a
request not answered yet gets a 503. (A non-streamed response already being written cannot be completed.)
"""

from __future__ import annotations

import asyncio
import json
import logging

from radixserve.gateway.api.errors import ApiError
from radixserve.gateway.api.sse import DONE, sse_event

log = logging.getLogger("radixserve.gateway.drain")

SHUTTING_DOWN = ApiError(503, "the server is shutting down", code="service_unavailable")
CUT_SHORT = ApiError(
    503,
    "the server shut down before this request finished (--shutdown-timeout)",
    code="service_unavailable",
)


class _Exchange:
    """One HTTP request in progress, as far as cut() needs to know it."""

    def __init__(self, task: asyncio.Task):
        self.task = task
        self.started = False  # response headers sent
        self.event_stream = False  # ... as text/event-stream
        self.complete = False  # last body message sent
        self.cut = False


class DrainGate:
    def __init__(self, app):
        self.app = app
        self.active = 0  # HTTP requests in progress
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._exchanges: set[_Exchange] = set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.closed:
            await _refuse(send)
            return
        exchange = _Exchange(asyncio.current_task())

        async def tracked_send(message) -> None:
            if message["type"] == "http.response.start":
                exchange.started = True
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                exchange.event_stream = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                exchange.complete = True
            await send(message)

        self.active += 1
        self._idle.clear()
        self._exchanges.add(exchange)
        try:
            try:
                await self.app(scope, receive, tracked_send)
            except asyncio.CancelledError:
                # Our own cancellation ends the request below; another one (a forced stop) goes on.
                if not exchange.cut or exchange.task.uncancel() > 0:
                    raise
            if exchange.cut:
                await _end_cut_short(exchange, send)
        finally:
            self._exchanges.discard(exchange)
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    def close(self) -> None:
        """Refuse new requests from now on."""
        self.closed = True

    async def wait_idle(self, timeout: float) -> bool:
        """Whether the requests in progress all ended within timeout seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def cut(self, grace: float) -> bool:
        """Stop the requests in progress, each with a proper end (see the module docstring); whether they
        had all ended within grace seconds."""
        for exchange in list(self._exchanges):
            if not exchange.cut and not exchange.complete:
                exchange.cut = True
                exchange.task.cancel()
        return await self.wait_idle(grace)


async def _end_cut_short(exchange: _Exchange, send) -> None:
    if exchange.complete:
        return
    if not exchange.started:
        await _refuse(send, CUT_SHORT)
    elif exchange.event_stream:
        await send(
            {
                "type": "http.response.body",
                "body": sse_event(CUT_SHORT.body()) + DONE,
                "more_body": False,
            }
        )
    else:
        log.warning("a response cut at --shutdown-timeout could not be completed")


async def _refuse(send, error: ApiError = SHUTTING_DOWN) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
