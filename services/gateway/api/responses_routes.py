"""OpenAI's Responses API: POST /v1/responses (streamed or not), and the stored responses
(retrieve, delete, cancel, input_items). A request becomes the chat request the chat route makes
(its input as messages) and runs through the same pipeline: chat_input, plan_tools, the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from radixserve.gateway.api import responses_format as rfmt
from radixserve.gateway.api.errors import ApiError, bad_request, not_supported
from radixserve.gateway.api.media import MediaLimits, load_images, media_limits
from radixserve.gateway.api.openai_routes import chat_input, engine_of, image_urls
from radixserve.gateway.api.protocol import ChatCompletionRequest, openapi_body
from radixserve.gateway.api.responses_protocol import (
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    InputItemsQuery,
    ResponsesRequest,
)
from radixserve.gateway.api.sse import named_sse_event, run_unless_disconnected, sse_response
from radixserve.gateway.pipeline import special_tokens
from radixserve.gateway.pipeline.chat_reasoning import CountingSplitter, reasoning_parser_for
from radixserve.gateway.pipeline.chat_tools import plan_tools
from radixserve.gateway.pipeline.choices import merged_streams
from radixserve.gateway.pipeline.engine import Engine, collect
from radixserve.gateway.pipeline.tool_parsers import (
    ConstrainedStreamingParser,
    StreamingToolParser,
)
from radixserve.gateway.pipeline.generation import (
    Cancellation,
    Completion,
    Delta,
    Finish,
    PreparedRequest,
)
from radixserve.gateway.pipeline.request_control import live_requests
from radixserve.gateway.pipeline.response_store import ResponseStore
from radixserve.gateway.pipeline.sampling import parse_body, validation_error

log = logging.getLogger("radixserve.gateway.responses")
router = APIRouter()
MAX_BACKGROUND_RESPONSES = 256  # background responses generating at once


def response_store(request: Request) -> ResponseStore:
    """The app's store of responses, made on first use."""
    state = request.app.state
    store = getattr(state, "response_store", None)
    if store is None:
        store = state.response_store = ResponseStore()
    return store


def check_id(response_id: str, param: str) -> None:
    """As OpenAI: an id that is not a response id at all is a 400 (an unknown one is not found)."""
    if not response_id.startswith("resp_"):
        raise bad_request(
            f"Invalid '{param}': '{response_id[:64]}'. Expected an ID that begins with 'resp'.",
            param=param,
            code="invalid_value",
        )


def stored(request: Request, response_id: str):
    check_id(response_id, "response_id")
    entry = response_store(request).get(response_id)
    if entry is None:
        raise ApiError(
            404,
            f"Response with id '{response_id}' not found.",
            param="response_id",
            code="response_not_found",
        )
    return entry


# ---- POST /v1/responses ----


def check_request(req: ResponsesRequest) -> None:
    if req.background and not req.store:
        raise bad_request("background mode requires store=true", param="background")
    if req.background and req.stream:
        raise not_supported("streaming a background response", param="stream")
    if req.include:
        raise not_supported(f"include {req.include[0]!r}", param="include")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise bad_request(
            f"max_output_tokens must be at least 1, got {req.max_output_tokens}",
            param="max_output_tokens",
            code="invalid_value",
        )
    metadata = req.metadata or {}
    if len(metadata) > MAX_METADATA_PAIRS:
        raise bad_request(f"metadata holds at most {MAX_METADATA_PAIRS} pairs", param="metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise bad_request(
                f"metadata keys are at most {MAX_METADATA_KEY} characters and values at most "
                f"{MAX_METADATA_VALUE}",
                param="metadata",
            )


def chat_request(req: ResponsesRequest, items: list[dict]) -> ChatCompletionRequest:
    """The chat request this Responses request amounts to."""
    body = {
        "messages": rfmt.chat_messages(req.instructions, items),
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": rfmt.chat_tools(req),
        "tool_choice": rfmt.chat_tool_choice(req),
        "response_format": rfmt.response_format(req),
        "user": req.user,
    }
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


async def prepare(
    engine: Engine,
    limits: MediaLimits,
    req: ResponsesRequest,
    items: list[dict],
    response_id: str,
    own_from: int = 0,
    lora: str = "",
) -> tuple[ChatCompletionRequest, PreparedRequest]:
    """Tokenized and checked, run with LoRA adapter lora; items from index own_from on are this
    request's own (the rest come from previous_response_id). Their images are loaded once, within
    limits (media_limits), as the chat route loads its image_url parts. With truncation "auto", the oldest items are dropped until
    the conversation fits the context (a function call's outputs go with it)."""
    defaults = (await engine.model_info()).sampling_defaults
    where = rfmt.image_urls(items, own_from)
    files = dict(zip((url for url, _ in where), await load_images(where, limits, "input")))
    while True:
        chat = chat_request(req, items)
        images = {at: files[url] for at, url in image_urls(chat).items()}
        inp = chat_input(chat, defaults, images)
        inp.request_id = response_id
        inp.prompt_param = "input"
        inp.lora_name = lora
        try:
            return chat, await engine.prepare(inp)
        except ApiError as e:
            if req.truncation != "auto" or e.code != "context_length_exceeded" or len(items) < 2:
                raise
        items = items[1:]
        while len(items) > 1 and items[0]["type"] == "function_call_output":
            items = items[1:]


@router.post("/v1/responses", openapi_extra=openapi_body(ResponsesRequest))
async def create_response(request: Request):
    started = time.monotonic()
    engine = engine_of(request)
    req = parse_body(await request.body(), ResponsesRequest)
    lora = await engine.lora.resolve(req.model)
    check_request(req)
    store = response_store(request)
    history: list[dict] = []
    if req.previous_response_id is not None:
        check_id(req.previous_response_id, "previous_response_id")
        previous = store.get(req.previous_response_id)
        if previous is None:
            raise bad_request(
                f"Previous response with id '{req.previous_response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if previous.response["status"] == "in_progress":
            raise bad_request(
                f"Previous response with id '{req.previous_response_id}' is still in progress.",
                param="previous_response_id",
            )
        history = previous.context
    own_items = rfmt.input_items(req)
    if not own_items and not history:
        raise bad_request("input must not be empty", param="input")
    items = history + own_items
    if all(item["type"] == "reasoning" for item in items):
        raise bad_request("input must hold more than reasoning items", param="input")
    live = live_requests(request)
    response_id = rfmt.new_id("resp")
    chat, prepared = await live.deadline(started).run(
        prepare(engine, media_limits(request), req, items, response_id, len(history), lora)
    )
    plan = plan_tools(
        chat.tools,
        chat.tool_choice,
        engine.args.tool_call_parser,
        await engine.model_info(),
        prepared.sampling,
    )
    reasoning = reasoning_parser_for(engine, constrained=prepared.sampling.constraint is not None)
    prepared = special_tokens.for_parsers(prepared, plan, reasoning)
    reader = OutputReader(CountingSplitter(reasoning), plan.stream_parser() if plan else None)
    head = rfmt.ResponseHead(
        response_id,
        engine.lora.shown_name(req.model, lora),
        req,
        prepared.sampling.temperature,
        prepared.sampling.top_p,
    )
    builder = rfmt.OutputBuilder(req.parallel_tool_calls)

    def keep(response: dict) -> None:
        if req.store:
            store.put(response, own_items, items + response["output"])

    def finished(result: Completion) -> dict:
        response = finished_response(result, reader, head, builder)
        keep(response)
        return response

    cancellation = Cancellation()
    if req.stream:
        events = response_events(engine, prepared, reader, head, builder, keep, cancellation)
        return await sse_response(
            request,
            live.tracked_events(response_id, [prepared], started, cancellation, events),
            frame=named_sse_event,
            done=b"",
        )
    generation = generate(engine, prepared, cancellation, reader, builder)
    if req.background:
        return JSONResponse(
            start_background(
                request, head, generation, prepared, started, cancellation, finished, keep
            )
        )
    with live.track(response_id, [prepared], started, cancellation):
        [result] = await run_unless_disconnected(request, generation)
    return JSONResponse(finished(result))


@dataclass
class OutputReader:
    """One response's output as OutputBuilder reads it: reasoning split off (--reasoning-parser),
    then tool calls read from the content."""

    splitter: CountingSplitter
    tools: StreamingToolParser | ConstrainedStreamingParser | None

    def read(self, delta: Delta) -> list:
        reasoning, content = self.splitter.feed(delta.text, len(delta.token_ids))
        return self._events(reasoning, content, final=False)

    def finish(self) -> list:
        reasoning, content = self.splitter.finish()
        return self._events(reasoning, content, final=True)

    def _events(self, reasoning: str, content: str, final: bool) -> list:
        events: list = [rfmt.ReasoningText(reasoning)] if reasoning else []
        if self.tools is None:
            return events + [content]
        return events + self.tools.feed(content) + (self.tools.finish() if final else [])


async def generate(
    engine: Engine,
    prepared: PreparedRequest,
    cancellation: Cancellation,
    reader: OutputReader,
    builder: rfmt.OutputBuilder,
) -> list[Completion]:
    """The whole generation, read into builder delta by delta (its events unused): the reasoning
    tokens are counted by delta, as when streaming."""

    async def items() -> AsyncIterator[Delta | Finish]:
        stream = merged_streams(engine, [prepared], cancellation)
        try:
            async for _, item in stream:
                if isinstance(item, Delta):
                    builder.feed(reader.read(item))
                yield item
        finally:
            await stream.aclose()

    return [await collect(items())]


def finished_response(
    result: Completion, reader: OutputReader, head: rfmt.ResponseHead, builder: rfmt.OutputBuilder
) -> dict:
    """The response of a whole generation, its deltas already read."""
    builder.feed(reader.finish())
    status = rfmt.final_status(result.finish)
    builder.finish(status)
    return head.response(
        status, builder.output, result.finish, reasoning_tokens=reader.splitter.reasoning_tokens
    )


async def response_events(
    engine: Engine,
    prepared: PreparedRequest,
    reader: OutputReader,
    head: rfmt.ResponseHead,
    builder: rfmt.OutputBuilder,
    keep: Callable[[dict], None],
    cancellation: Cancellation,
) -> AsyncIterator[dict]:
    """response.created and .in_progress, the output items' events, then response.completed
    (.incomplete when cut by max_output_tokens; .failed when the generation failed or was
    cancelled)."""
    stream = merged_streams(engine, [prepared], cancellation)
    try:
        _, item = await anext(stream)  # before any event, so early failures get a real HTTP status
        yield builder.event("response.created", response=head.response("in_progress", []))
        yield builder.event("response.in_progress", response=head.response("in_progress", []))
        finish: Finish | None = None
        try:
            while True:
                if isinstance(item, Delta):
                    for event in builder.feed(reader.read(item)):
                        yield event
                else:
                    finish = item
                    for event in builder.feed(reader.finish()):
                        yield event
                try:
                    _, item = await anext(stream)
                except StopAsyncIteration:
                    break
        except ApiError as e:
            error = {"code": "server_error", "message": e.message}
            failed = head.response("failed", builder.output, error=error)
            yield builder.event("response.failed", response=failed)
            return
        status = rfmt.final_status(finish)
        for event in builder.finish(status):
            yield event
        response = head.response(
            status, builder.output, finish, reasoning_tokens=reader.splitter.reasoning_tokens
        )
        keep(response)
        kind = {"completed": "completed", "incomplete": "incomplete"}.get(status, "failed")
        yield builder.event(f"response.{kind}", response=response)
    finally:
        await stream.aclose()


# ---- background mode ----


@dataclass
class BackgroundRun:
    task: asyncio.Task
    cancellation: Cancellation


def background_runs(request: Request) -> dict[str, BackgroundRun]:
    """The app's background responses still running, by response id, made on first use."""
    state = request.app.state
    runs = getattr(state, "background_responses", None)
    if runs is None:
        runs = state.background_responses = {}
    return runs


def start_background(
    request: Request,
    head: rfmt.ResponseHead,
    generation: Awaitable[list[Completion]],
    prepared: PreparedRequest,
    started: float,
    cancellation: Cancellation,
    finished: Callable[[Completion], dict],
    keep: Callable[[dict], None],
) -> dict:
    """Store the response in progress and generate it in a task, independent of this connection;
    answers the response as it stands."""
    runs = background_runs(request)
    if len(runs) >= MAX_BACKGROUND_RESPONSES:
        generation.close()
        raise ApiError(
            429,
            f"at most {MAX_BACKGROUND_RESPONSES} background responses run at once",
            param="background",
            code="too_many_background_responses",
        )
    live = live_requests(request)
    pending = head.response("in_progress", [])
    keep(pending)

    async def run() -> None:
        try:
            with live.track(head.id, [prepared], started, cancellation):
                [result] = await generation
            finished(result)
        except Exception as e:
            if not isinstance(e, ApiError):
                log.exception("background response %s failed", head.id)
            message = e.message if isinstance(e, ApiError) else "Internal server error"
            keep(head.response("failed", [], error={"code": "server_error", "message": message}))
        finally:
            runs.pop(head.id, None)

    runs[head.id] = BackgroundRun(asyncio.ensure_future(run()), cancellation)
    return pending


# ---- stored responses ----


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request):
    if request.query_params.get("stream", "false").lower() == "true":
        raise not_supported("streaming a stored response again", param="stream")
    return JSONResponse(stored(request, response_id).response)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    stored(request, response_id)
    run = background_runs(request).get(response_id)
    if run is not None:
        run.cancellation.cancel()
        await asyncio.shield(run.task)
    response_store(request).delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request):
    """Cancels a background response still running; cancelling it again answers it as it ended."""
    run = background_runs(request).get(response_id)
    if run is not None:
        run.cancellation.cancel()
        await asyncio.shield(run.task)
    response = stored(request, response_id).response
    if not response["background"]:
        raise bad_request(
            "Only responses created with background=true can be cancelled.", param="response_id"
        )
    if response["status"] != "cancelled":
        raise bad_request(
            f"Cannot cancel a response with status '{response['status']}'.", param="response_id"
        )
    return JSONResponse(response)


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request):
    params = request.query_params
    try:
        query = InputItemsQuery.model_validate(
            {k: params[k] for k in ("after", "limit", "order") if k in params}
        )
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    items = list(stored(request, response_id).input_items)
    if query.order == "desc":
        items.reverse()
    if query.after is not None:
        ids = [item["id"] for item in items]
        if query.after not in ids:
            raise bad_request(f"no input item with id {query.after!r}", param="after")
        items = items[ids.index(query.after) + 1 :]
    page = items[: query.limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > len(page),
    }
