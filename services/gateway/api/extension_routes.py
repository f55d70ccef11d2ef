"""The peers' utility endpoints: /tokenize and /detokenize (vLLM's shapes; SGLang's batched prompts too,
also under /v1/), and /version."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request

from radixserve.gateway.api.errors import bad_request
from radixserve.gateway.api.openai_routes import chat_conversation, check_model, engine_of
from radixserve.gateway.api.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    openapi_body,
)
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.pipeline.sampling import parse_body

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
