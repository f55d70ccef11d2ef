"""--api-key: `Authorization: Bearer KEY` on every HTTP route but the health checks, and on the gRPC API.
Anthropic's routes also take the key as Anthropic's clients send it (`x-api-key: KEY`) and answer
a refusal in Anthropic's error shape."""

from __future__ import annotations

import hmac

import grpc
from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from radixserve.common.grpc_security import denying_handler
from radixserve.gateway.api.anthropic_format import error_body as anthropic_error_body
from radixserve.gateway.api.anthropic_protocol import is_anthropic_path
from radixserve.gateway.api.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/health_generate"})
OPEN_GRPC_METHODS = frozenset({"/radixserve.v1.Gateway/Health"})


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def key_matches(authorization: str | None, api_key: str) -> bool:
    return token_matches(bearer_token(authorization), api_key)


def token_matches(token: str | None, api_key: str) -> bool:
    return token is not None and hmac.compare_digest(token.encode(), api_key.encode())


def auth_error(authorization: str | None) -> ApiError:
    """OpenAI's answers: code null for a missing key, invalid_api_key for a wrong one."""
    if bearer_token(authorization) is None:
        return ApiError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            type="invalid_request_error",
        )
    return ApiError(
        401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key"
    )


class ApiKeyMiddleware:
    """Pure ASGI, so it answers before routing: unknown paths get 401 too, not 404."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        authorization = headers.get("authorization")
        if key_matches(authorization, self.api_key):
            return await self.app(scope, receive, send)
        if is_anthropic_path(scope["path"]):
            x_api_key = headers.get("x-api-key")
            if token_matches(x_api_key, self.api_key):
                return await self.app(scope, receive, send)
            message = "invalid x-api-key" if x_api_key or authorization else "missing x-api-key"
            body = anthropic_error_body(ApiError(401, message))
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        err = auth_error(authorization)
        response = JSONResponse(
            err.body(), status_code=err.status, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)


def install_api_key(app: FastAPI, api_key: str | None) -> None:
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)


class GrpcApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        self.api_key = api_key

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_GRPC_METHODS:
            return handler
        authorization = next(
            (
                value
                for key, value in handler_call_details.invocation_metadata or ()
                if key == "authorization"
            ),
            None,
        )
        if key_matches(authorization, self.api_key):
            return handler
        return denying_handler(
            handler, grpc.StatusCode.UNAUTHENTICATED, auth_error(authorization).message
        )


def grpc_interceptors(api_key: str | None) -> list[grpc.aio.ServerInterceptor]:
    return [GrpcApiKeyInterceptor(api_key)] if api_key else []
