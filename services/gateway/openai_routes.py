"""OpenAI-compatible REST endpoints: /v1/chat/completions, /v1/completions, /v1/models."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from radixserve.v1 import common_pb2
from services.gateway import openai_format as fmt
from services.gateway.engine import Engine
from services.gateway.errors import ApiError, bad_request, not_supported
from services.gateway.generation import Delta, Finish, GenerationInput, PreparedRequest
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.sampling import build_sampling, parse_body, reject_unsupported, stop_list
from services.gateway.sse import run_unless_disconnected, sse_response

router = APIRouter()
STARTED_AT = int(time.time())


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def check_model(engine: Engine, model: str | None) -> None:
    if model and model not in (engine.served_name, engine.args.model_path):
        raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


# ---- /v1/models ----

async def model_card(engine: Engine) -> dict:
    info = await engine.model_info()
    return {"id": engine.served_name, "object": "model", "created": STARTED_AT, "owned_by": "radixserve",
            "root": info.model_path, "parent": None, "max_model_len": info.context_length}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [await model_card(engine_of(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    engine = engine_of(request)
    check_model(engine, model_id)
    return await model_card(engine)


# ---- /v1/chat/completions ----

def chat_conversation(req: ChatCompletionRequest) -> common_pb2.ChatConversation:
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            kinds = {p.type for p in content} - {"text"}
            if kinds:
                raise not_supported(f"content of type {sorted(kinds)[0]!r}", param=f"messages.{i}.content")
            content = "\n".join(p.text or "" for p in content)
        messages.append(common_pb2.ChatMessage(
            role="system" if m.role == "developer" else m.role, content=content or "", name=m.name or "",
            tool_calls_json=json.dumps(m.tool_calls) if m.tool_calls else "",
            tool_call_id=m.tool_call_id or ""))
    return common_pb2.ChatConversation(
        messages=messages, add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
        continue_final_message=req.continue_final_message,
        tools_json=json.dumps(req.tools) if req.tools else "")


def chat_input(req: ChatCompletionRequest) -> GenerationInput:
    reject_unsupported(n=req.n, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                       repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias)
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise not_supported(f"response_format {req.response_format.get('type')!r}", param="response_format")
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    sampling = build_sampling(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
        max_tokens=max_tokens, max_tokens_param=max_param, stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs)
    return GenerationInput(chat_conversation(req), sampling, stop_list(req.stop), req.skip_special_tokens,
                           request_id=f"chatcmpl-{uuid.uuid4().hex}", prompt_param="messages")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    engine = engine_of(request)
    req = parse_body(await request.body(), ChatCompletionRequest)
    check_model(engine, req.model)
    prepared = await engine.prepare(chat_input(req))
    meta = fmt.ResponseMeta(prepared.request_id, engine.served_name,
                            include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage))
    with_top = bool(req.top_logprobs)
    if req.stream:
        return await sse_response(request, chat_events(engine, prepared, meta, bool(req.logprobs), with_top))
    result = await run_unless_disconnected(request, engine.complete(prepared))
    logprobs = None
    if req.logprobs:
        texts = await engine.token_texts(fmt.logprob_token_ids(result.logprobs))
        logprobs = fmt.chat_logprobs(result.logprobs, texts, with_top)
    return JSONResponse(fmt.chat_response(meta, result.text, result.finish, logprobs))


async def chat_events(engine: Engine, prepared: PreparedRequest, meta: fmt.ResponseMeta, want_logprobs: bool,
                      with_top: bool) -> AsyncIterator[dict]:
    stream = engine.stream(prepared)
    try:
        item = await anext(stream)  # before the role chunk, so early failures get a real HTTP status
        yield fmt.chat_chunk(meta, {"role": "assistant", "content": ""})
        while isinstance(item, Delta):
            logprobs = None
            if want_logprobs and item.logprobs:
                texts = await engine.token_texts(fmt.logprob_token_ids(item.logprobs))
                logprobs = fmt.chat_logprobs(item.logprobs, texts, with_top)
            if item.text or logprobs:
                yield fmt.chat_chunk(meta, {"content": item.text}, logprobs=logprobs)
            item = await anext(stream)
        yield fmt.chat_chunk(meta, {}, item.reason)
        if meta.include_usage:
            yield fmt.usage_chunk(meta, "chat.completion.chunk", item)
    finally:
        await stream.aclose()


# ---- /v1/completions ----

def completion_prompt(prompt) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return list(prompt)
    if len(prompt) > 1:
        raise not_supported("more than one prompt per request", param="prompt")
    return prompt[0] if isinstance(prompt[0], str) else list(prompt[0])


def completion_input(req: CompletionRequest) -> GenerationInput:
    reject_unsupported(n=req.n, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                       repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias)
    if req.echo:
        raise not_supported("echo", param="echo")
    if req.suffix:
        raise not_supported("suffix", param="suffix")
    if req.best_of is not None and req.best_of != 1:
        raise not_supported("best_of other than 1", param="best_of")
    if req.logprobs is not None and req.logprobs < 0:
        raise bad_request("logprobs must be between 0 and 20", param="logprobs")
    logprobs = req.logprobs is not None
    sampling = build_sampling(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
        max_tokens=req.max_tokens, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
        logprobs=logprobs, top_logprobs=req.logprobs)
    return GenerationInput(completion_prompt(req.prompt), sampling, stop_list(req.stop), req.skip_special_tokens,
                           request_id=f"cmpl-{uuid.uuid4().hex}", prompt_param="prompt")


@router.post("/v1/completions")
async def completions(request: Request):
    engine = engine_of(request)
    req = parse_body(await request.body(), CompletionRequest)
    check_model(engine, req.model)
    prepared = await engine.prepare(completion_input(req))
    meta = fmt.ResponseMeta(prepared.request_id, engine.served_name,
                            include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage))
    want_logprobs = req.logprobs is not None
    if req.stream:
        return await sse_response(request, completion_events(engine, prepared, meta, want_logprobs))
    result = await run_unless_disconnected(request, engine.complete(prepared))
    logprobs = None
    if want_logprobs:
        texts = await engine.token_texts(fmt.logprob_token_ids(result.logprobs))
        logprobs = fmt.completion_logprobs(result.logprobs, texts)
    return JSONResponse(fmt.completion_response(meta, result.text, result.finish, logprobs))


async def completion_events(engine: Engine, prepared: PreparedRequest, meta: fmt.ResponseMeta,
                            want_logprobs: bool) -> AsyncIterator[dict]:
    stream = engine.stream(prepared)
    offset = 0
    try:
        async for item in stream:
            if isinstance(item, Finish):
                yield fmt.completion_chunk(meta, "", item.reason)
                if meta.include_usage:
                    yield fmt.usage_chunk(meta, "text_completion", item)
                return
            logprobs = None
            if want_logprobs and item.logprobs:
                texts = await engine.token_texts(fmt.logprob_token_ids(item.logprobs))
                logprobs = fmt.completion_logprobs(item.logprobs, texts, offset)
            offset += len(item.text)
            if item.text or logprobs:
                yield fmt.completion_chunk(meta, item.text, logprobs=logprobs)
    finally:
        await stream.aclose()
