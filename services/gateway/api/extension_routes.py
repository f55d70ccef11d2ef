"""The peers' utility endpoints: /tokenize and /detokenize (vLLM's shapes; SGLang's batched prompts too,
also under /v1/), /version, and SGLang's /v1/score (its pure part in scoring.py)."""

from __future__ import annotations

import time
import uuid
from importlib import metadata

from fastapi import APIRouter, Request

from radixserve.gateway.api.errors import ApiError, bad_request
from radixserve.gateway.api.openai_routes import chat_conversation, check_model, engine_of
from radixserve.gateway.api.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    ScoreRequest,
    TokenizeRequest,
    openapi_body,
)
from radixserve.gateway.api.scoring import (
    check_labels,
    label_scores,
    score_prompts,
    score_response,
)
from radixserve.gateway.api.sse import run_unless_disconnected
from radixserve.gateway.pipeline.choices import complete_all
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.pipeline.generation import (
    Cancellation,
    Completion,
    GenerationInput,
    PreparedRequest,
)
from radixserve.gateway.pipeline.request_control import live_requests
from radixserve.gateway.pipeline.sampling import build_sampling, parse_body

router = APIRouter()
PACKAGE = "radixserve"


def package_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


@router.get("/version")
async def version():
    return {"version": package_version()}


@router.post("/tokenize", openapi_extra=openapi_body(TokenizeRequest))
@router.post("/v1/tokenize", openapi_extra=openapi_body(TokenizeRequest), include_in_schema=False)
async def tokenize(request: Request):
    """{count, max_model_len, tokens} (and token_strs when asked); a list of prompts (SGLang) gives lists."""
    engine = engine_of(request)
    req = parse_body(await request.body(), TokenizeRequest)
    check_model(engine, req.model)
    info = await engine.model_info()
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt and messages", param="prompt")
    batched = isinstance(req.prompt, list)
    if req.messages is not None:
        ids = [await chat_ids(engine, req)]
    else:
        prompts = req.prompt if batched else [req.prompt]
        engine.check_sequences(len(prompts), "prompt", f"{len(prompts)} prompts")
        special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = await engine.encode(prompts, "prompt", special) if prompts else []
    answer = await tokenize_answer(engine, ids, info.context_length, req.return_token_strs)
    if batched:
        return answer
    return {key: value[0] if isinstance(value, list) else value for key, value in answer.items()}


async def chat_ids(engine: Engine, req: TokenizeRequest) -> list[int]:
    chat = ChatCompletionRequest(
        messages=req.messages,
        tools=req.tools,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
    )
    prompt, ids = await engine.render_chat(chat_conversation(chat))
    if req.add_special_tokens:  # the template's special tokens and the tokenizer's (vLLM)
        [ids] = await engine.encode([prompt], "messages", True)
    return ids


async def tokenize_answer(
    engine: Engine, ids: list[list[int]], context_length: int, with_strs: bool
) -> dict:
    """Per prompt (lists; the caller unwraps a single prompt's)."""
    answer = {
        "count": [len(i) for i in ids],
        "max_model_len": context_length,
        "tokens": ids,
    }
    if with_strs:
        texts = await engine.token_texts(sorted({t for i in ids for t in i}))
        answer["token_strs"] = [[texts[t] for t in i] for i in ids]
    return answer


@router.post("/detokenize", openapi_extra=openapi_body(DetokenizeRequest))
@router.post(
    "/v1/detokenize", openapi_extra=openapi_body(DetokenizeRequest), include_in_schema=False
)
async def detokenize(request: Request):
    """{prompt} as vLLM answers, and the same text as `text`, as SGLang does; lists for a batch."""
    engine = engine_of(request)
    req = parse_body(await request.body(), DetokenizeRequest)
    check_model(engine, req.model)
    batched = bool(req.tokens) and isinstance(req.tokens[0], list)
    sequences = req.tokens if batched else [req.tokens]
    engine.check_sequences(len(sequences), "tokens", f"{len(sequences)} token lists")
    texts = []
    for ids in sequences:
        await engine.check_token_ids(ids, "tokens")
        texts.append(await engine.detokenize(ids))
    text = texts if batched else texts[0]
    return {"prompt": text, "text": text}


# ---- /v1/score (SGLang) ----


@router.post("/v1/score", openapi_extra=openapi_body(ScoreRequest))
async def score(request: Request):
    """Per item, each label token's probability at the position after its prompt: one greedy output
    position per item, the items generated together (the radix cache shares the query's KV)."""
    started = time.monotonic()
    engine = engine_of(request)
    req = parse_body(await request.body(), ScoreRequest)
    check_model(engine, req.model)
    check_labels(req.label_token_ids)
    prompts = score_prompts(req.query, req.items, req.item_first)
    engine.check_sequences(len(prompts), "items", f"{len(prompts)} items")
    await engine.check_token_ids(req.label_token_ids, "label_token_ids")
    if not isinstance(req.query, str):
        await engine.check_token_ids(req.query, "query")
    score_id = f"score-{uuid.uuid4().hex}"
    live = live_requests(request)
    deadline = live.deadline(started)
    requests = await deadline.run(prepare_scores(engine, prompts, req.label_token_ids, score_id))
    cancellation = Cancellation()
    with live.track(score_id, requests, started, cancellation):
        results = await run_unless_disconnected(
            request, complete_all(engine, requests, cancellation)
        )
    scores = []
    for result in results:
        logprobs = label_logprobs(result)
        if logprobs is None:  # aborted before its output position: at the deadline or by request
            if deadline.remaining() == 0:
                raise deadline.error()
            raise ApiError(499, "the request was cancelled", code="cancelled")
        scores.append(label_scores(req.label_token_ids, logprobs, req.apply_softmax))
    prompt_tokens = sum(len(r.input_ids) for r in requests)
    return score_response(engine.served_name, scores, prompt_tokens)


async def prepare_scores(
    engine: Engine, prompts: list[str | list[int]], labels: list[int], score_id: str
) -> list[PreparedRequest]:
    """One generation per item: a single greedy output position returning the labels' logprobs
    (server sampling defaults do not apply: a score is the model's distribution)."""
    sampling, stopping = build_sampling(
        temperature=0.0,
        top_p=None,
        top_k=None,
        min_p=None,
        seed=None,
        max_tokens=1,
        stop_token_ids=None,
        ignore_eos=False,
        logprobs=True,
        token_ids_logprob=labels,
    )
    return [
        await engine.prepare(
            GenerationInput(
                prompt, sampling, stopping, request_id=f"{score_id}-{i}", prompt_param="items"
            )
        )
        for i, prompt in enumerate(prompts)
    ]


def label_logprobs(result: Completion) -> dict[int, float] | None:
    """The labels' logprobs at the output position (None: the generation ended before it)."""
    if not result.logprobs:
        return None
    return {entry.token_id: entry.logprob for entry in result.logprobs[0].token_ids_logprobs}
