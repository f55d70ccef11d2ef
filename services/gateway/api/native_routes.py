"""SGLang-style native endpoints: /generate, /abort_request, /health, /get_model_info, /get_server_info,
/flush_cache."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict

from radixserve.v1 import common_pb2, scheduler_pb2
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.api.errors import ApiError, bad_request, from_grpc, not_supported
from radixserve.gateway.api.media import MediaLimits, load_images, media_limits
from radixserve.gateway.api import openai_format as fmt
from radixserve.gateway.pipeline.generation import (
    Cancellation,
    Completion,
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


def image_data_urls(req: NativeGenerateRequest) -> list[str]:
    """The one prompt's image URLs of image_data."""
    data = req.image_data
    if data is None:
        return []
    if isinstance(data, str):
        return [data]
    if data and isinstance(data[0], list):
        if len(data) != 1:
            raise not_supported("more than one prompt per request", param="image_data")
        return list(data[0])
    return list(data)


async def native_images(req: NativeGenerateRequest, limits: MediaLimits) -> list[bytes]:
    urls = image_data_urls(req)
    if urls and req.text is None:
        raise bad_request("image_data needs text, not input_ids", param="image_data")
    where = [(url, f"image_data.{i}") for i, url in enumerate(urls)]
    return await load_images(where, limits, "image_data", bare_base64=True)


def native_input(
    req: NativeGenerateRequest,
    defaults: SamplingDefaults = NO_DEFAULTS,
    images: list[bytes] | None = None,
) -> GenerationInput:
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", param="text")
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
        logprobs=req.return_logprob,
        top_logprobs=req.top_logprobs_num,
        prompt_logprob_start=req.logprob_start_len if req.return_logprob else -1,
        prompt_top_logprobs=req.top_logprobs_num if req.return_logprob else 0,
        token_ids_logprob=req.token_ids_logprob if req.return_logprob else None,
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
        images=images or [],
    )


@dataclass
class LogprobsSoFar:
    """What /generate's meta_info shows of logprobs (return_logprob): the prompt's from
    logprob_start_len on and the output's, in SGLang's (logprob, token_id, text) tuples."""

    req: NativeGenerateRequest
    prompt_ids: list[int]
    prompt: list[common_pb2.TokenLogprob] = field(default_factory=list)
    output: list[common_pb2.TokenLogprob] = field(default_factory=list)

    def add(self, item: Delta | Completion) -> None:
        self.prompt += item.prompt_logprobs
        self.output += item.logprobs

    async def fields(self, engine: Engine) -> dict:
        start = self.req.logprob_start_len
        # The first prompt token has no logprob: its entry is None when the range starts there.
        inputs: list[tuple[int, common_pb2.TokenLogprob | None]] = []
        if start >= 0:
            inputs = list(
                zip(self.prompt_ids[start:], ([None] if start == 0 else []) + self.prompt)
            )
        outputs = [(e.token_id, e) for e in self.output]
        texts: dict[int, str] | None = None
        if self.req.return_text_in_logprobs:
            ids = [t for t, _ in inputs] + fmt.logprob_token_ids(self.prompt + self.output)
            ids += list(self.req.token_ids_logprob or ())
            texts = await engine.token_texts(ids)

        def entry(logprob: float | None, token_id: int) -> list:
            return [logprob, token_id, None if texts is None else texts.get(token_id, "")]

        def tokens(pairs) -> list:
            return [entry(e.logprob if e is not None else None, t) for t, e in pairs]

        def tops(pairs) -> list:
            return [
                None if e is None else [entry(a.logprob, a.token_id) for a in e.top]
                for _, e in pairs
            ]

        out = {
            "input_token_logprobs": tokens(inputs),
            "output_token_logprobs": tokens(outputs),
        }
        if self.req.top_logprobs_num > 0:
            out["input_top_logprobs"] = tops(inputs)
            out["output_top_logprobs"] = tops(outputs)
        if self.req.token_ids_logprob:
            out["output_token_ids_logprobs"] = [
                [entry(a.logprob, a.token_id) for a in e.token_ids_logprobs] for e in self.output
            ]
        return out


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
    images = await live.deadline(started).run(native_images(req, media_limits(request)))
    inp = native_input(req, defaults, images)
    if req.lora_path:  # SGLang's adapter choice: an adapter name (or BASE:ADAPTER)
        lora = await engine.lora.resolve(req.lora_path, "lora_path")
        inp = dataclasses.replace(inp, lora_name=lora)
    prepared = await live.deadline(started).run(engine.prepare(inp))
    cancellation = Cancellation()
    if req.stream:
        return await sse_response(
            request,
            live.tracked_events(
                prepared.request_id,
                [prepared],
                started,
                cancellation,
                native_events(
                    engine,
                    prepared,
                    started,
                    cancellation,
                    LogprobsSoFar(req, prepared.input_ids) if req.return_logprob else None,
                ),
            ),
        )
    with live.track(prepared.request_id, [prepared], started, cancellation):
        result = await run_unless_disconnected(
            request, engine.complete(prepared, cancellation=cancellation)
        )
    info = meta_info(
        prepared.request_id, result.finish, len(prepared.input_ids), len(result.token_ids), started
    )
    if req.return_logprob:
        logprobs = LogprobsSoFar(req, prepared.input_ids)
        logprobs.add(result)
        info.update(await logprobs.fields(engine))
    return JSONResponse({"text": result.text, "output_ids": result.token_ids, "meta_info": info})


async def native_events(
    engine: Engine,
    prepared: PreparedRequest,
    started: float,
    cancellation: Cancellation | None = None,
    logprobs: LogprobsSoFar | None = None,
) -> AsyncIterator[dict]:
    """Cumulative text, output ids (and logprobs) in every event, as SGLang streams them."""
    text, ids = "", []
    stream = engine.stream(prepared, cancellation=cancellation)
    try:
        async for item in stream:
            finish = item if isinstance(item, Finish) else None
            if isinstance(item, Delta):
                text += item.text
                ids += item.token_ids
                if logprobs is not None:
                    logprobs.add(item)
                # With a tokenizer, a delta whose text is held back (stop strings, partial UTF-8) waits
                # for the next; without one (--skip-tokenizer-init) every delta carries ids only.
                if not item.text and (engine.uses_tokenizer or not item.token_ids):
                    continue
            info = meta_info(
                prepared.request_id, finish, len(prepared.input_ids), len(ids), started
            )
            if logprobs is not None:
                info.update(await logprobs.fields(engine))
            yield {"text": text, "output_ids": list(ids), "meta_info": info}
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
        "kv_cache_dtype": info.kv_cache_dtype or None,
        "kv_bytes_per_token": info.kv_bytes_per_token or None,
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
