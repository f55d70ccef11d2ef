"""The FastAPI application: routes plus error handlers that always answer in OpenAI's error shape."""

from __future__ import annotations

import contextlib
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from radixserve.common.args import ServerArgs
from radixserve.gateway.api import (
    anthropic_routes,
    batch_routes,
    embedding_routes,
    extension_routes,
    lora_routes,
    metrics_routes,
    native_routes,
    openai_routes,
    responses_routes,
)
from radixserve.gateway.api.auth import install_api_key
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.api.errors import ApiError
from radixserve.gateway.api.media import MediaLimits, open_fetch_client
from radixserve.gateway.api.payload_limit import install_payload_limit
from radixserve.gateway.telemetry.request_tracing import untraced_http_request
from radixserve.gateway.pipeline.sampling import validation_error

log = logging.getLogger("radixserve.gateway.app")


def create_app(args: ServerArgs, engine: Engine | None = None) -> FastAPI:
    engine = engine or Engine(args)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        # One client for the app's image downloads (media.py), closed last: batch runs fetch too.
        async with open_fetch_client(args.media_fetch_timeout) as fetch_client:
            _app.state.media = MediaLimits.from_args(args, fetch_client)
            _app.state.batch_runner.resume_unfinished()
            yield
            await _app.state.batch_runner.close()
            await engine.close()
            _app.state.media = MediaLimits.from_args(args)

    # FastAPI's own OpenTelemetry instrumentation makes the HTTP request span (honouring an incoming
    # traceparent) once tracing.setup has installed a tracer provider; Prometheus does the metrics.
    app = FastAPI(
        title="radixserve",
        version="0.1.0",
        lifespan=lifespan,
        telemetry={"metrics": False, "exclude": untraced_http_request},
    )
    app.state.args = args
    app.state.engine = engine
    app.state.media = MediaLimits.from_args(args)  # the lifespan adds the shared fetch client
    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(native_routes.router)
    app.include_router(embedding_routes.router)
    app.include_router(extension_routes.router)
    app.include_router(metrics_routes.router)
    app.include_router(lora_routes.router)
    batch_routes.install(app, args)
    install_api_key(app, args.api_key)
    install_payload_limit(app, args.max_payload_size)
    install_error_handlers(app)
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError):
        err = validation_error(exc.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ClientDisconnect)
    async def on_client_disconnect(request: Request, _exc: ClientDisconnect):
        # Raised while reading the body: an ordinary event, logged once, without a traceback. The answer
        # goes nowhere (the server drops what is sent to a gone client) but completes the request.
        log.info(
            "client disconnected while sending the body of %s %s", request.method, request.url.path
        )
        err = ApiError(499, "the client disconnected", code="client_disconnected")
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        err = ApiError(exc.status_code, message, code=None)
        return JSONResponse(
            err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        err = ApiError(500, "Internal server error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)
