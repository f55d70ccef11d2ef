"""SGLang-style native endpoints: /generate, /abort_request, /health, /get_model_info, /get_server_info,
/flush_cache."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict

from radixserve.v1 import scheduler_pb2
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.api.errors import ApiError, bad_request, from_grpc, not_supported
from radixserve.gateway.pipeline.generation import (
    Cancellation,
    Delta,
    Finish,
    GenerationInput,
    PreparedRequest,
)
from radixserve.gateway.api.protocol import (
    AbortRequest,
    NativeGenerateRequest,
    NativeSamplingParams,
    openapi_body,
)
from radixserve.gateway.pipeline.request_control import live_requests
from radixserve.common.sampling import SamplingDefaults
from radixserve.gateway.pipeline.sampling import (
    NATIVE_DEFAULT_MAX_NEW_TOKENS,
    NO_DEFAULTS,
    build_sampling,
    parse_body,
    stop_list,
    stop_regexes,
)
from radixserve.gateway.api.sse import run_unless_disconnected, sse_response
from radixserve.gateway.pipeline.structured_output import request_constraint

router = APIRouter()


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


# ---- /generate ----


def _single(value, name: str):
    """SGLang batches lists of prompts; only one prompt per request is supported so far."""
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        if len(value) != 1:
            raise not_supported("more than one prompt per request", param=name)
        return value[0]
    return value


def native_input(
    req: NativeGenerateRequest, defaults: SamplingDefaults = NO_DEFAULTS
) -> GenerationInput:
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", param="text")
    if req.return_logprob:
        raise not_supported("return_logprob on /generate", param="return_logprob")
    sp = req.sampling_params or NativeSamplingParams()
    sampling, stopping = build_sampling(
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        min_p=sp.min_p,
        seed=sp.seed,
        max_tokens=sp.max_new_tokens,
        max_tokens_param="max_new_tokens",
        stop_token_ids=sp.stop_token_ids,
        ignore_eos=sp.ignore_eos,
        frequency_penalty=sp.frequency_penalty,
        presence_penalty=sp.presence_penalty,
        repetition_penalty=sp.repetition_penalty,
        min_tokens=sp.min_new_tokens,
        min_tokens_param="min_new_tokens",
        defaults=defaults,
    )
    sampling.constraint = request_constraint(
        json_schema=sp.json_schema, regex=sp.regex, ebnf=sp.ebnf, param_prefix="sampling_params."
    )
    if req.text is not None:
        prompt, param = _single(req.text, "text"), "text"
    else:
        prompt, param = list(_single(req.input_ids, "input_ids")), "input_ids"
    return GenerationInput(
        prompt,
        sampling,
        stopping,
        stop_list(sp.stop),
        sp.skip_special_tokens,
        request_id=req.rid or uuid.uuid4().hex,
        prompt_param=param,
        default_max_new_tokens=defaults.max_new_tokens or NATIVE_DEFAULT_MAX_NEW_TOKENS,
        stop_regex=stop_regexes(sp.stop_regex, "sampling_params.stop_regex"),
    )


def meta_info(
    request_id: str,
    finish: Finish | None,
    prompt_tokens: int,
    completion_tokens: int,
    started: float,
) -> dict:
    finish_reason = None
    cached = 0
    if finish is not None:
        cached = finish.cached_tokens
        finish_reason = {"type": finish.reason}
        if finish.reason == "stop":
            finish_reason["matched"] = finish.matched
        elif finish.reason == "length":
            finish_reason["length"] = finish.completion_tokens
    return {
        "id": request_id,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached,
        "e2e_latency": round(time.monotonic() - started, 4),
    }


@router.post("/generate", openapi_extra=openapi_body(NativeGenerateRequest))
async def generate(request: Request):
    engine = engine_of(request)
    started = time.monotonic()
    req = parse_body(await request.body(), NativeGenerateRequest)
    prompts = req.text if req.text is not None else req.input_ids
    if (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], (str, list))
    ):  # a batch of prompts
        engine.check_sequences(
            len(prompts), "text" if req.text is not None else "input_ids", f"{len(prompts)} prompts"
        )
    live = live_requests(request)
    defaults = (await engine.model_info()).sampling_defaults
    prepared = await live.deadline(started).run(engine.prepare(native_input(req, defaults)))
    cancellation = Cancellation()
    if req.stream:
        return await sse_response(
            request,
            live.tracked_events(
                prepared.request_id,
                [prepared],
                started,
                cancellation,
                native_events(engine, prepared, started, cancellation),
            ),
        )
    with live.track(prepared.request_id, [prepared], started, cancellation):
        result = await run_unless_disconnected(
            request, engine.complete(prepared, cancellation=cancellation)
        )
    return JSONResponse(
        {
            "text": result.text,
            "output_ids": result.token_ids,
            "meta_info": meta_info(
                prepared.request_id,
                result.finish,
                len(prepared.input_ids),
                len(result.token_ids),
                started,
            ),
        }
    )


async def native_events(
    engine: Engine,
    prepared: PreparedRequest,
    started: float,
    cancellation: Cancellation | None = None,
) -> AsyncIterator[dict]:
    """Cumulative text and output ids in every event, as SGLang streams them."""
    text, ids = "", []
    stream = engine.stream(prepared, cancellation=cancellation)
    try:
        async for item in stream:
            finish = item if isinstance(item, Finish) else None
            if isinstance(item, Delta):
                text += item.text
                ids += item.token_ids
                # With a tokenizer, a delta whose text is held back (stop strings, partial UTF-8) waits
                # for the next; without one (--skip-tokenizer-init) every delta carries ids only.
                if not item.text and (engine.uses_tokenizer or not item.token_ids):
                    continue
            yield {
                "text": text,
                "output_ids": list(ids),
                "meta_info": meta_info(
                    prepared.request_id, finish, len(prepared.input_ids), len(ids), started
                ),
            }
    finally:
        await stream.aclose()


@router.post("/abort_request", openapi_extra=openapi_body(AbortRequest))
async def abort_request(request: Request):
    """Ends a request (its response finishes with finish_reason "abort"), or every request."""
    req = parse_body(await request.body(), AbortRequest)
    live = live_requests(request)
    if req.abort_all:
        return {"aborted": await live.abort_all()}
    if not req.rid:
        raise bad_request(
            "give rid (a request id: a response's id, or /generate's meta_info.id) or abort_all",
            param="rid",
        )
    aborted = await live.abort(req.rid)
    if not aborted:
        raise ApiError(
            404, f"No running request has id {req.rid!r}.", param="rid", code="request_not_found"
        )
    return {"aborted": aborted}


# ---- health and info ----


@router.get("/health")
@router.get("/health_generate")
async def health(request: Request):
    healthy, detail = await engine_of(request).health()
    if healthy:
        return Response(status_code=200)
    return JSONResponse(
        {
            "error": {
                "message": f"unhealthy: {detail}",
                "type": "service_unavailable_error",
                "param": None,
                "code": "unhealthy",
            }
        },
        status_code=503,
    )


@router.get("/get_model_info")
async def get_model_info(request: Request):
    engine = engine_of(request)
    info = await engine.model_info()
    return {
        "model_path": info.model_path,
        "tokenizer_path": info.tokenizer_path,
        "is_generation": True,
        "served_model_name": info.served_name,
        "architecture": info.architecture,
        "context_length": info.context_length,
        "vocab_size": info.vocab_size,
        "eos_token_ids": info.eos_token_ids,
        "preferred_sampling_params": info.sampling_defaults.as_dict() or None,
    }


@router.get("/get_server_info")
async def get_server_info(request: Request):
    engine = engine_of(request)
    sched = await engine.scheduler_info()
    scheduler = MessageToDict(
        sched, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    config = scheduler.pop("config_json", "")
    try:
        scheduler["config"] = json.loads(config) if config else {}
    except json.JSONDecodeError:
        scheduler["config"] = config
    secrets = {f.name: None for f in dataclasses.fields(engine.args) if f.metadata.get("secret")}
    return {
        **dataclasses.asdict(engine.args),
        **secrets,
        "served_model_name": engine.served_name,
        "sampling_defaults": (await engine.model_info()).sampling_defaults.as_dict(),
        "scheduler": scheduler,
        "version": "radixserve-0.1.0",
    }


@router.post("/flush_cache")
@router.get("/flush_cache")
async def flush_cache(request: Request):
    try:
        resp = (
            await engine_of(request)
            .stubs()
            .scheduler.FlushCache(scheduler_pb2.SchedulerFlushCacheRequest(), timeout=30)
        )
    except grpc.aio.AioRpcError as e:
        raise from_grpc(e, "scheduler") from None
    return {"freed_tokens": resp.freed_tokens}
