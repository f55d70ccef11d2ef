"""--max-payload-size: request bodies larger than the limit get 413, in OpenAI's error shape.

A pure ASGI middleware: a Content-Length over the limit is refused before the app runs; a body without
one (chunked) or with a lying one is counted as it is read, and once past the limit the read fails and
whatever the app would have answered is replaced by the 413.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from radixserve.gateway.api.anthropic_format import error_body as anthropic_error_body
from radixserve.gateway.api.anthropic_protocol import is_anthropic_path
from radixserve.gateway.api.errors import ApiError


class PayloadTooLarge(Exception):
    """Raised into the app from receive() when the body passes the limit."""


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than the server's limit of {limit} bytes.",
        code="payload_too_large",
    )


class PayloadLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        received = 0
        exceeded = response_started = False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise PayloadTooLarge()
            return message

        async def guarded_send(message):
            nonlocal response_started
            if exceeded and not response_started:
                return  # the app's answer to a cut-off body is replaced by the 413
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send) -> None:
        err = too_large(self.max_bytes)
        body = anthropic_error_body(err) if is_anthropic_path(scope["path"]) else err.body()
        await JSONResponse(body, status_code=err.status, headers={"Connection": "close"})(
            scope, receive, send
        )


def install_payload_limit(app, max_bytes: int | None) -> None:
    if max_bytes and max_bytes > 0:
        app.add_middleware(PayloadLimitMiddleware, max_bytes=max_bytes)
