"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens, run by the chat
pipeline (the body becomes the chat request the chat route runs); errors in Anthropic's shape."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from radixserve.gateway.api import anthropic_format as fmt
from radixserve.gateway.api.anthropic_protocol import (
    COUNT_TOKENS_PATH,
    MESSAGES_PATH,
    CountTokensRequest,
    MessagesRequest,
)
from radixserve.gateway.api.errors import ApiError
from radixserve.gateway.api.media import media_limits
from radixserve.gateway.api.openai_routes import chat_images, chat_input, engine_of
from radixserve.gateway.api.payload_limit import PayloadTooLarge
from radixserve.gateway.api.protocol import openapi_body
from radixserve.gateway.api.sse import named_sse_event, run_unless_disconnected, sse_response
from radixserve.gateway.pipeline.chat_tools import ToolPlan, plan_tools
from radixserve.gateway.pipeline.choices import complete_all, merged_streams
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.pipeline.generation import Cancellation, Delta, PreparedRequest
from radixserve.gateway.pipeline.request_control import live_requests
from radixserve.gateway.pipeline.sampling import parse_body
from radixserve.gateway.pipeline.tool_parsers import ParsedOutput

log = logging.getLogger("radixserve.gateway.anthropic")


class AnthropicErrorRoute(APIRoute):
    """A route whose errors are answered in Anthropic's shape (the app's handlers answer OpenAI's)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handler(request)
            except ApiError as e:
                return anthropic_error(e)
            except (ClientDisconnect, PayloadTooLarge):  # the app's and the middleware's to answer
                raise
            except Exception:
                log.exception("unexpected error serving %s %s", request.method, request.url.path)
                return anthropic_error(ApiError(500, "Internal server error"))

        return answer


def anthropic_error(err: ApiError) -> JSONResponse:
    return JSONResponse(fmt.error_body(err), status_code=err.status, headers=err.headers)


router = APIRouter(route_class=AnthropicErrorRoute)


@router.post(MESSAGES_PATH, openapi_extra=openapi_body(MessagesRequest))
async def create_message(request: Request):
    started = time.monotonic()
    engine = engine_of(request)
    body = parse_body(await request.body(), MessagesRequest)
    lora = await engine.lora.resolve(body.model)
    chat = fmt.chat_request(body)
    live = live_requests(request)
    images = await live.deadline(started).run(chat_images(chat, media_limits(request)))
    generation = chat_input(chat, (await engine.model_info()).sampling_defaults, images)
    generation.request_id = f"msg_{uuid.uuid4().hex}"
    generation.lora_name = lora
    fmt.up_to_the_context(generation)
    prepared = await live.deadline(started).run(engine.prepare(generation))
    info = await engine.model_info()
    tools = plan_tools(
        chat.tools, chat.tool_choice, engine.args.tool_call_parser, info, prepared.sampling
    )
    meta = fmt.MessageMeta(
        prepared.request_id,
        engine.lora.shown_name(body.model, lora),
        single_call=fmt.single_tool_call(body.tool_choice),
        context_cut=prepared.stopping.max_new_tokens < body.max_tokens,
    )
    cancellation = Cancellation()
    if body.stream:
        writer = fmt.MessageStream(meta, len(prepared.input_ids))
        events = message_events(engine, prepared, tools, writer, cancellation)
        # Anthropic's framing: an event line per event, no [DONE], errors in its shape.
        return await sse_response(
            request,
            live.tracked_events(meta.id, [prepared], started, cancellation, events),
            frame=named_sse_event,
            done=b"",
            error_frame=anthropic_error_frame,
        )
    with live.track(meta.id, [prepared], started, cancellation):
        [result] = await run_unless_disconnected(
            request, complete_all(engine, [prepared], cancellation)
        )
    output = tools.parse(result.text) if tools else ParsedOutput(result.text, [])
    return JSONResponse(fmt.message(meta, output, result.finish))


@router.post(COUNT_TOKENS_PATH, openapi_extra=openapi_body(CountTokensRequest))
async def count_tokens(request: Request):
    """The prompt's length: the chat template applied to system, messages and tools, tokenized."""
    started = time.monotonic()
    engine = engine_of(request)
    body = parse_body(await request.body(), CountTokensRequest)
    await engine.lora.resolve(body.model)  # an adapter's prompt is the base model's
    chat = fmt.chat_request(body, max_tokens=1)
    deadline = live_requests(request).deadline(started)
    images = await deadline.run(chat_images(chat, media_limits(request)))
    prepared = await deadline.run(engine.prepare(chat_input(chat, images=images)))
    return {"input_tokens": len(prepared.input_ids)}


async def message_events(
    engine: Engine,
    prepared: PreparedRequest,
    tools: ToolPlan | None,
    writer: fmt.MessageStream,
    cancellation: Cancellation,
) -> AsyncIterator[dict]:
    stream = merged_streams(engine, [prepared], cancellation)
    parser = tools.stream_parser() if tools else None
    started = False
    try:
        async for _, item in stream:
            if not started:  # after the first item, so that early failures get a real HTTP status
                started = True
                for event in writer.start():
                    yield event
            if isinstance(item, Delta):
                for event in writer.feed(parser.feed(item.text) if parser else [item.text]):
                    yield event
                continue
            for event in writer.feed(parser.finish() if parser else []) + writer.finish(item):
                yield event
    finally:
        await stream.aclose()


def anthropic_error_frame(error: ApiError) -> bytes:
    return named_sse_event(fmt.error_body(error))
