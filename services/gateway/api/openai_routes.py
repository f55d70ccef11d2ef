"""OpenAI-compatible REST endpoints: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import json
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from radixserve.v1 import common_pb2
from radixserve.gateway.api import openai_format as fmt
from radixserve.gateway.api import prompt_logprob_views as prompt_views
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.api.errors import ApiError, bad_request, not_supported
from radixserve.gateway.api.media import MediaLimits, load_images, media_limits
from radixserve.gateway.pipeline.chat_reasoning import (
    ReasoningDelivery,
    reasoning_parser_for,
    split_delta,
    split_rest,
    split_text,
)
from radixserve.gateway.pipeline import special_tokens
from radixserve.gateway.pipeline.chat_tools import ToolPlan, plan_tools, tools_for_template
from radixserve.gateway.pipeline.reasoning_parsers import ReasoningParser
from radixserve.gateway.pipeline.choices import complete_all, fan_out, merged_streams, total_usage
from radixserve.gateway.pipeline.generation import (
    Cancellation,
    Completion,
    Delta,
    Finish,
    GenerationInput,
    PreparedRequest,
)
from radixserve.gateway.api.protocol import ChatCompletionRequest, CompletionRequest, openapi_body
from radixserve.gateway.pipeline.request_control import live_requests
from radixserve.common.sampling import SamplingDefaults
from radixserve.gateway.pipeline.sampling import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    NO_DEFAULTS,
    build_sampling,
    parse_body,
    penalty_args,
    prompt_logprob_args,
    stop_list,
    stop_regexes,
)
from radixserve.gateway.api.sse import run_unless_disconnected, sse_response
from radixserve.gateway.api.token_ids import StreamedTokenIds
from radixserve.gateway.pipeline.structured_output import request_constraint

router = APIRouter()
STARTED_AT = int(time.time())
MAX_CHOICES = 128


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def check_model(engine: Engine, model: str | None) -> None:
    if model and model not in (engine.served_name, engine.args.model_path):
        raise ApiError(
            404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )


# ---- /v1/models ----


async def model_card(engine: Engine) -> dict:
    info = await engine.model_info()
    return {
        "id": engine.served_name,
        "object": "model",
        "created": STARTED_AT,
        "owned_by": "radixserve",
        "root": engine.served_name,
        "parent": None,
        "max_model_len": info.context_length,
    }


def adapter_card(base: dict, name: str, path: str) -> dict:
    """A LoRA adapter's /v1/models entry (vLLM's form): its parent is the base model."""
    return {**base, "id": name, "root": path, "parent": base["id"]}


@router.get("/v1/models")
async def list_models(request: Request):
    engine = engine_of(request)
    base = await model_card(engine)
    adapters = (await engine.lora.names()).items()
    return {"object": "list", "data": [base] + [adapter_card(base, n, p) for n, p in adapters]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    engine = engine_of(request)
    lora = await engine.lora.resolve(model_id)
    base = await model_card(engine)
    return adapter_card(base, lora, engine.lora.paths[lora]) if lora else base


# ---- shared by both endpoints ----


def choice_count(n: int | None) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise bad_request(
            f"n must be between 1 and {MAX_CHOICES}, got {n}", param="n", code="invalid_value"
        )
    return n


def response_meta(engine: Engine, request_id: str, body, lora: str = "") -> fmt.ResponseMeta:
    """The response's id and fields; its model as body names it when that is LoRA adapter lora."""
    options = body.stream_options if body.stream else None
    return fmt.ResponseMeta(
        request_id,
        engine.lora.shown_name(body.model, lora),
        include_usage=bool(options and (options.include_usage or options.continuous_usage_stats)),
        continuous_usage=bool(options and options.continuous_usage_stats),
    )


class RunningCounts:
    """Token counts of a streamed response so far, for continuous usage stats."""

    def __init__(self, prompts: list[PreparedRequest], n: int):
        self.prompt_tokens = sum(len(p.input_ids) for p in prompts[::n])
        self.completion_tokens = 0

    def add(self, delta: Delta) -> Finish:
        self.completion_tokens += len(delta.token_ids)
        return self.now()

    def now(self) -> Finish:
        return Finish("", None, self.prompt_tokens, self.completion_tokens, 0)


# ---- /v1/chat/completions ----


def chat_conversation(
    req: ChatCompletionRequest, images: dict[tuple[int, int], bytes] | None = None
) -> common_pb2.ChatConversation:
    """images: the files of the image_url parts by (message, part) index (chat_images); without
    them an image part is refused."""
    messages = []
    for i, m in enumerate(req.messages):
        content, parts = m.content, []
        if isinstance(content, list):
            kinds = {p.type for p in content} - {"text"} - ({"image_url"} if images else set())
            if kinds:
                raise not_supported(
                    f"content of type {sorted(kinds)[0]!r}", param=f"messages.{i}.content"
                )
            if any(p.type == "image_url" for p in content):
                parts = [
                    common_pb2.ChatContentPart(image=images[i, j])
                    if p.type == "image_url"
                    else common_pb2.ChatContentPart(text=p.text or "")
                    for j, p in enumerate(content)
                ]
                content = ""
            else:
                content = "\n".join(p.text or "" for p in content)
        messages.append(
            common_pb2.ChatMessage(
                role="system" if m.role == "developer" else m.role,
                content=content or "",
                name=m.name or "",
                tool_calls_json=json.dumps(calls) if (calls := message_tool_calls(m)) else "",
                tool_call_id=m.tool_call_id or "",
                content_parts=parts,
            )
        )
    return common_pb2.ChatConversation(
        messages=messages,
        add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
        continue_final_message=req.continue_final_message,
        tools_json=json.dumps(tools)
        if (tools := tools_for_template(req.tools, req.tool_choice))
        else "",
        template_kwargs_json=json.dumps(req.chat_template_kwargs)
        if req.chat_template_kwargs
        else "",
    )


def message_tool_calls(message) -> list[dict] | None:
    """An assistant message's calls: tool_calls, or the one call of OpenAI's deprecated
    function_call (shown to the chat template as a tool call)."""
    if message.tool_calls or not message.function_call:
        return message.tool_calls
    return [{"id": "", "type": "function", "function": message.function_call}]


def image_urls(req: ChatCompletionRequest) -> dict[tuple[int, int], str]:
    """The URLs of the request's image_url parts by (message, part) index."""
    return {
        (i, j): p.url
        for i, m in enumerate(req.messages)
        if isinstance(m.content, list)
        for j, p in enumerate(m.content)
        if p.type == "image_url"
    }


async def chat_images(
    req: ChatCompletionRequest, limits: MediaLimits
) -> dict[tuple[int, int], bytes]:
    """The files of the request's image_url parts by (message, part) index, fetched concurrently."""
    urls = image_urls(req)
    where = [(url, f"messages.{i}.content.{j}.image_url") for (i, j), url in urls.items()]
    return dict(zip(urls, await load_images(where, limits, "messages")))


def chat_input(
    req: ChatCompletionRequest,
    defaults: SamplingDefaults = NO_DEFAULTS,
    images: dict[tuple[int, int], bytes] | None = None,
) -> GenerationInput:
    choice_count(req.n)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    sampling, stopping = build_sampling(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        max_tokens=max_tokens,
        max_tokens_param=max_param,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs,
        defaults=defaults,
        **penalty_args(req),
        **prompt_logprob_args(prompt_logprobs=req.prompt_logprobs, stream=bool(req.stream)),
    )
    sampling.constraint = request_constraint(
        response_format=req.response_format,
        regex=req.regex,
        ebnf=req.ebnf,
        structured_outputs=req.structured_outputs,
    )
    return GenerationInput(
        chat_conversation(req, images),
        sampling,
        stopping,
        stop_list(req.stop),
        req.skip_special_tokens,
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        prompt_param="messages",
        default_max_new_tokens=defaults.max_new_tokens,  # None: to the end of the context
        stop_regex=stop_regexes(req.stop_regex),
        truncate_prompt_tokens=req.truncate_prompt_tokens,
    )


@dataclass
class ChatOptions:
    logprobs: bool
    with_top: bool
    tools: ToolPlan | None
    reasoning: ReasoningParser | None = None
    token_ids: StreamedTokenIds | None = None  # return_token_ids
    stream_reasoning: bool = True
    include_reasoning: bool = True


@router.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    started = time.monotonic()
    engine = engine_of(request)
    req = parse_body(await request.body(), ChatCompletionRequest)
    lora = await engine.lora.resolve(req.model)
    n = choice_count(req.n)
    engine.check_sequences(n, "n", f"n={n}")
    live = live_requests(request)
    defaults = (await engine.model_info()).sampling_defaults
    images = await live.deadline(started).run(chat_images(req, media_limits(request)))
    inp = dataclasses.replace(chat_input(req, defaults, images), lora_name=lora)
    prepared = await live.deadline(started).run(engine.prepare(inp))
    tools = plan_tools(
        req.tools,
        req.tool_choice,
        engine.args.tool_call_parser,
        await engine.model_info(),
        prepared.sampling,
    )
    reasoning = reasoning_parser_for(
        engine,
        req.separate_reasoning,
        req.chat_template_kwargs,
        constrained=prepared.sampling.constraint is not None,
    )
    prepared = special_tokens.for_parsers(prepared, tools, reasoning)
    requests = fan_out(prepared, n)
    token_ids = StreamedTokenIds(
        bool(req.return_token_ids), [r.input_ids for r in requests], prompt_in_choice=False
    )
    options = ChatOptions(
        bool(req.logprobs),
        bool(req.top_logprobs),
        tools,
        reasoning,
        token_ids,
        stream_reasoning=req.stream_reasoning,
        include_reasoning=req.include_reasoning,
    )
    meta = response_meta(engine, prepared.request_id, req, lora)
    cancellation = Cancellation()
    if req.stream:
        return await sse_response(
            request,
            live.tracked_events(
                prepared.request_id,
                requests,
                started,
                cancellation,
                token_ids.attached(chat_events(engine, requests, meta, options, cancellation)),
            ),
        )
    with live.track(prepared.request_id, requests, started, cancellation):
        results = await run_unless_disconnected(
            request, complete_all(engine, requests, cancellation)
        )
    choices = [await chat_choice(engine, i, result, options) for i, result in enumerate(results)]
    response = fmt.chat_response(meta, choices, total_usage([r.finish for r in results], n))
    if req.return_token_ids:
        response["prompt_token_ids"] = prepared.input_ids
        for choice, result in zip(choices, results):
            choice["token_ids"] = result.token_ids
    if req.prompt_logprobs is not None:  # vLLM: one list for the request, beside the choices
        response["prompt_logprobs"] = await prompt_views.vllm_prompt_logprobs(
            engine, results[0].prompt_logprobs, req.prompt_logprobs
        )
    return JSONResponse(response)


async def chat_choice(engine: Engine, index: int, result: Completion, options: ChatOptions) -> dict:
    logprobs = None
    if options.logprobs:
        texts = await engine.token_texts(fmt.logprob_token_ids(result.logprobs))
        logprobs = fmt.chat_logprobs(result.logprobs, texts, options.with_top)
    split = split_text(options.reasoning, result.text)
    text, calls = split.content, None
    if options.tools is not None:  # calls are read from the content only
        parsed = options.tools.parse(text)
        text, calls = parsed.content, [call.to_openai() for call in parsed.tool_calls]
    if options.reasoning is not None and not text:
        text = None
    reasoning = split.reasoning if options.include_reasoning else None
    return fmt.chat_choice(index, text, result.finish, logprobs, calls, reasoning)


async def chat_events(
    engine: Engine,
    requests: list[PreparedRequest],
    meta: fmt.ResponseMeta,
    options: ChatOptions,
    cancellation: Cancellation | None = None,
) -> AsyncIterator[dict]:
    """Per choice: a role chunk, content (or tool-call) deltas, the last of them carrying the
    finish_reason (an empty delta carries it when the finish brings no output of its own); then
    the usage chunk when asked for."""
    stream = merged_streams(engine, requests, cancellation)
    parsers = [options.tools.stream_parser() if options.tools else None for _ in requests]
    splitters = [options.reasoning.splitter() if options.reasoning else None for _ in requests]
    deliveries = [
        ReasoningDelivery(options.stream_reasoning, options.include_reasoning) for _ in requests
    ]
    counts = RunningCounts(requests, len(requests))
    started: set[int] = set()
    held: dict[int, list[ChatPiece]] = {}  # a choice's last output, until its Finish (next item)
    finishes: list[Finish | None] = [None] * len(requests)
    try:
        index, item = await anext(
            stream
        )  # before any chunk, so early failures get a real HTTP status
        while True:
            if index not in started:
                started.add(index)
                yield fmt.chat_chunk(meta, {"role": "assistant", "content": ""}, index=index)
            parser = parsers[index]
            if isinstance(item, Delta):
                running = counts.add(item)
                if options.token_ids is not None:
                    options.token_ids.add(index, item.token_ids)
                logprobs = None
                if options.logprobs and item.logprobs:
                    texts = await engine.token_texts(fmt.logprob_token_ids(item.logprobs))
                    logprobs = fmt.chat_logprobs(item.logprobs, texts, options.with_top)
                reasoning, text = split_delta(splitters[index], item.text)
                reasoning = deliveries[index].deliver(reasoning, flush=bool(text))
                events = parser.feed(text) if parser else ([text] if text else [])
                deltas = reasoning_deltas(reasoning) + chat_deltas(events)
                pieces = chat_pieces(deltas, logprobs, running)
                if item.last:
                    held[index] = pieces
                    pieces = []
                for delta, logprobs, running in pieces:
                    yield fmt.chat_chunk(
                        meta, delta, logprobs=logprobs, index=index, running=running
                    )
            else:
                finishes[index] = item
                pieces = held.pop(index, [])
                reasoning, text = split_rest(splitters[index])
                reasoning = deliveries[index].deliver(reasoning, flush=True)
                events = (parser.feed(text) + parser.finish()) if parser is not None else [text]
                deltas = reasoning_deltas(reasoning) + chat_deltas(events)
                pieces += chat_pieces(deltas, None, counts.now())
                reason = fmt.chat_finish_reason(
                    item.reason, parser is not None and bool(parser.tool_calls)
                )
                pieces = pieces or [({}, None, None)]
                for i, (delta, logprobs, running) in enumerate(pieces):
                    yield fmt.chat_chunk(
                        meta,
                        delta,
                        reason if i == len(pieces) - 1 else None,
                        logprobs=logprobs,
                        index=index,
                        running=running,
                    )
            try:
                index, item = await anext(stream)
            except StopAsyncIteration:
                break
        if meta.include_usage:
            yield fmt.usage_chunk(
                meta, "chat.completion.chunk", total_usage(finishes, len(requests))
            )
    finally:
        await stream.aclose()


def reasoning_deltas(reasoning: str) -> list[dict]:
    return [fmt.reasoning_delta(reasoning)] if reasoning else []


ChatPiece = tuple[dict, dict | None, Finish | None]  # one chunk's delta, logprobs, running counts


def chat_pieces(
    deltas: list[dict], logprobs: dict | None, running: Finish | None
) -> list[ChatPiece]:
    """The chunks of one Delta: its logprobs ride on the first (or on an empty content delta)."""
    if not deltas:
        return [({"content": ""}, logprobs, running)] if logprobs else []
    return [(d, logprobs if i == 0 else None, running) for i, d in enumerate(deltas)]


def chat_deltas(events: list) -> list[dict]:
    """Tool-parser events as chat deltas: text -> content, dicts -> one tool_calls item each."""
    return [
        {"content": e} if isinstance(e, str) else {"tool_calls": [e]} for e in events if e != ""
    ]


# ---- /v1/completions ----


def prompt_count(prompt) -> int:
    """How many prompts completion_prompts will make of a request's prompt, without making them."""
    if isinstance(prompt, str) or not prompt or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


def completion_prompts(prompt) -> list[str | list[int]]:
    """The prompts of a request: a string, a token list, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def completion_input(
    req: CompletionRequest,
    prompt: str | list[int] | None = None,
    defaults: SamplingDefaults = NO_DEFAULTS,
) -> GenerationInput:
    choice_count(req.n)
    if req.suffix:
        raise not_supported("suffix", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise not_supported("best_of other than n", param="best_of")
    if req.logprobs is not None and req.logprobs < 0:
        raise bad_request("logprobs must be between 0 and 20", param="logprobs")
    logprobs = req.logprobs is not None
    sampling, stopping = build_sampling(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        max_tokens=req.max_tokens,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=req.logprobs,
        defaults=defaults,
        **penalty_args(req),
        **prompt_logprob_args(
            prompt_logprobs=req.prompt_logprobs,
            stream=bool(req.stream),
            echo_logprobs=req.logprobs if req.echo else None,
        ),
    )
    sampling.constraint = request_constraint(
        response_format=req.response_format,
        regex=req.regex,
        ebnf=req.ebnf,
        structured_outputs=req.structured_outputs,
    )
    if prompt is None:
        prompt = completion_prompts(req.prompt)[0]
    return GenerationInput(
        prompt,
        sampling,
        stopping,
        stop_list(req.stop),
        req.skip_special_tokens,
        request_id=f"cmpl-{uuid.uuid4().hex}",
        prompt_param="prompt",
        default_max_new_tokens=defaults.max_new_tokens or COMPLETION_DEFAULT_MAX_TOKENS,
        stop_regex=stop_regexes(req.stop_regex),
        truncate_prompt_tokens=req.truncate_prompt_tokens,
    )


@router.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
async def completions(request: Request):
    started = time.monotonic()
    engine = engine_of(request)
    req = parse_body(await request.body(), CompletionRequest)
    lora = await engine.lora.resolve(req.model)
    n = choice_count(req.n)
    # Before anything is made per sequence: 800 prompts x n 128 must cost nothing but this 400.
    count = prompt_count(req.prompt)
    engine.check_sequences(count * n, "n" if n > 1 else "prompt", f"{count} prompts x n={n}")
    prompts = completion_prompts(req.prompt)
    live = live_requests(request)
    prepared, echoes = await live.deadline(started).run(
        prepare_completions(engine, req, prompts, n, lora)
    )
    requests = [copy for i, p in enumerate(prepared) for copy in fan_out(p, n, first_index=i * n)]
    meta = response_meta(engine, prepared[0].request_id, req, lora)
    want_logprobs = req.logprobs is not None
    cancellation = Cancellation()
    token_ids = StreamedTokenIds(
        bool(req.return_token_ids), [r.input_ids for r in requests], prompt_in_choice=True
    )
    if req.stream:
        return await sse_response(
            request,
            live.tracked_events(
                meta.id,
                requests,
                started,
                cancellation,
                token_ids.attached(
                    completion_events(
                        engine,
                        requests,
                        n,
                        meta,
                        want_logprobs,
                        echoes,
                        cancellation,
                        token_ids,
                        req.logprobs,
                    )
                ),
            ),
        )
    with live.track(meta.id, requests, started, cancellation):
        results = await run_unless_disconnected(
            request, complete_all(engine, requests, cancellation)
        )
    choices = []
    for i, result in enumerate(results):
        logprobs = None
        if want_logprobs:
            logprobs = await prompt_views.completion_choice_logprobs(
                engine,
                requests[i].input_ids,
                result.prompt_logprobs,
                result.logprobs,
                echoes[i],
                req.logprobs,
            )
        choice = fmt.completion_choice(i, echoes[i] + result.text, result.finish, logprobs)
        if req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = await prompt_views.vllm_prompt_logprobs(
                engine, result.prompt_logprobs, req.prompt_logprobs
            )
        choices.append(choice)
        if req.return_token_ids:
            choices[-1]["prompt_token_ids"] = requests[i].input_ids
            choices[-1]["token_ids"] = result.token_ids
    return JSONResponse(
        fmt.completion_response(meta, choices, total_usage([r.finish for r in results], n))
    )


async def prepare_completions(
    engine: Engine,
    req: CompletionRequest,
    prompts: list[str | list[int]],
    n: int,
    lora: str = "",
) -> tuple[list[PreparedRequest], list[str]]:
    """Each prompt tokenized and checked (run with LoRA adapter lora), and the echo text of each
    choice ("" without echo)."""
    defaults = (await engine.model_info()).sampling_defaults
    prepared = [
        await engine.prepare(
            dataclasses.replace(completion_input(req, p, defaults), lora_name=lora)
        )
        for p in prompts
    ]
    echoes = [await echo_text(engine, p) if req.echo else "" for p in prompts for _ in range(n)]
    return prepared, echoes


async def echo_text(engine: Engine, prompt: str | list[int]) -> str:
    """The prompt as text, for echo (token-id prompts are decoded, special tokens included)."""
    return prompt if isinstance(prompt, str) else await engine.detokenize(prompt)


async def completion_events(
    engine: Engine,
    requests: list[PreparedRequest],
    n: int,
    meta: fmt.ResponseMeta,
    want_logprobs: bool,
    echoes: list[str],
    cancellation: Cancellation | None = None,
    token_ids: StreamedTokenIds | None = None,
    top_logprobs: int | None = None,
) -> AsyncIterator[dict]:
    stream = merged_streams(engine, requests, cancellation)
    offsets = [len(echo) for echo in echoes]
    counts = RunningCounts(requests, n)
    held: dict[int, tuple] = {}  # a choice's last output, until its Finish (the next item)
    finishes: list[Finish | None] = [None] * len(requests)
    # With logprobs, an echo waits for its choice's first delta, which brings the prompt's logprobs.
    echo_waits = {i for i, echo in enumerate(echoes) if echo and want_logprobs}
    try:
        for index, echo in enumerate(echoes):
            if echo and index not in echo_waits:
                yield fmt.completion_chunk(meta, echo, index=index)
        async for index, item in stream:
            if index in echo_waits:
                echo_waits.discard(index)
                echo_logprobs = None
                if isinstance(item, Delta):
                    echo_logprobs = await prompt_views.echo_chunk_logprobs(
                        engine, requests[index].input_ids, item.prompt_logprobs, top_logprobs or 0
                    )
                yield fmt.completion_chunk(meta, echoes[index], logprobs=echo_logprobs, index=index)
            if isinstance(item, Finish):
                finishes[index] = item
                text, logprobs, running = held.pop(index, ("", None, None))
                yield fmt.completion_chunk(
                    meta, text, item.reason, logprobs=logprobs, index=index, running=running
                )
                continue
            running = counts.add(item)
            if token_ids is not None:
                token_ids.add(index, item.token_ids)
            logprobs = None
            if want_logprobs and item.logprobs:
                texts = await engine.token_texts(fmt.logprob_token_ids(item.logprobs))
                logprobs = fmt.completion_logprobs(item.logprobs, texts, offsets[index])
            offsets[index] += len(item.text)
            if item.last:
                held[index] = (item.text, logprobs, running)
            elif item.text or logprobs or meta.continuous_usage:
                yield fmt.completion_chunk(
                    meta, item.text, logprobs=logprobs, index=index, running=running
                )
        if meta.include_usage:
            yield fmt.usage_chunk(meta, "text_completion", total_usage(finishes, n))
    finally:
        await stream.aclose()
