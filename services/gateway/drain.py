"""The gateway's drain on SIGTERM: new HTTP requests get 503, accepted ones run to their end.

DrainGate wraps the ASGI app and counts the HTTP requests in progress (a streamed response counts
until its last byte). Once closed it answers every new request 503 with an OpenAI error body and
`Connection: close`, /health included, so that load balancers stop sending traffic here. The
listening socket stays open while the accepted requests drain, so a client gets that clear 503
rather than a refused connection; when they are done, or --shutdown-timeout has passed, uvicorn
closes the socket and later connections are refused.
"""
from __future__ import annotations

import asyncio
import json

from radixserve.gateway.errors import ApiError

SHUTTING_DOWN = ApiError(503, "the server is shutting down", code="service_unavailable")


class DrainGate:
    def __init__(self, app):
        self.app = app
        self.active = 0  # HTTP requests in progress
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.closed:
            await _refuse(send)
            return
        self.active += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
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


async def _refuse(send) -> None:
    body = json.dumps(SHUTTING_DOWN.body()).encode()
    await send({"type": "http.response.start", "status": SHUTTING_DOWN.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
