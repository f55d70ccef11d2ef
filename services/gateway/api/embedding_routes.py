"""POST /v1/embeddings in OpenAI's shapes, and /v1/classify (alias /classify) in SGLang's and
vLLM's (servers started with --is-embedding).

`input` is a string, a list of strings, a list of token ids or a list of token-id lists; strings
get the model's special tokens. Inputs longer than the model takes are refused (400), not
truncated, and so are empty ones. `encoding_format` is "float" (JSON numbers) or "base64"
(little-endian float32). `dimensions`: see services/gateway/pipeline/embeddings.py. A sequence
classifier's (reward model's) embedding is its raw label scores; /v1/classify turns them into
probabilities and a label (services/gateway/pipeline/classification.py) and takes the same
`input` forms.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field, StrictInt, StrictStr

from radixserve.gateway.pipeline.classification import (
    check_classifier,
    class_labels,
    classification_data,
)
from radixserve.gateway.pipeline.embeddings import EmbeddingBatch, encode_vector
from radixserve.gateway.pipeline.engine import Engine
from radixserve.gateway.api.errors import bad_request, not_supported
from radixserve.gateway.api.openai_routes import check_model
from radixserve.gateway.api.protocol import Body, openapi_body
from radixserve.gateway.pipeline.request_control import Deadline
from radixserve.gateway.pipeline.sampling import parse_body
from radixserve.gateway.api.sse import run_unless_disconnected

router = APIRouter()


class EmbeddingRequest(Body):
    ignored = {"user": "an end-user id for OpenAI's abuse monitoring; nothing is monitored here"}
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)


class ClassifyRequest(Body):
    ignored = {"user": "an end-user id for abuse monitoring; nothing is monitored here"}
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: str | None = None


def embedding_inputs(value: str | list) -> list[str] | list[list[int]]:
    """The request's input as a list of texts or a list of token-id lists."""
    if not value:
        raise bad_request("input must not be empty", param="input")
    if isinstance(value, str):
        return [value]
    if isinstance(value[0], int):
        return [value]
    if isinstance(value[0], str) and not all(value):
        raise bad_request("input must not contain empty strings", param="input")
    return value


@router.post("/v1/embeddings", openapi_extra=openapi_body(EmbeddingRequest))
async def create_embeddings(request: Request):
    started = time.monotonic()
    engine: Engine = request.app.state.engine
    req = parse_body(await request.body(), EmbeddingRequest)
    lora = await engine.lora.resolve(req.model)
    if lora:  # named as chat's are; the scheduler's Embed runs the base model only
        raise not_supported(f"embedding with LoRA adapter {lora!r}", param="model")
    inputs = embedding_inputs(req.input)
    batch = await embed_within_deadline(request, engine, inputs, started)
    if req.dimensions is not None:
        batch = batch.shortened(req.dimensions)
    data = [
        {"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
        for i, v in enumerate(batch.vectors)
    ]
    usage = {"prompt_tokens": batch.prompt_tokens, "total_tokens": batch.prompt_tokens}
    return JSONResponse(
        {"object": "list", "data": data, "model": engine.served_name, "usage": usage}
    )


async def embed_within_deadline(
    request: Request, engine: Engine, inputs: list, started: float
) -> EmbeddingBatch:
    # At --request-timeout the call is cancelled: the scheduler drops its inputs still queued.
    deadline = Deadline(engine.args.request_timeout, started)
    return await run_unless_disconnected(request, deadline.run(engine.embed(inputs)))


@router.post("/v1/classify", openapi_extra=openapi_body(ClassifyRequest))
@router.post("/classify", include_in_schema=False)  # SGLang's path, the same route
async def classify(request: Request):
    started = time.monotonic()
    engine: Engine = request.app.state.engine
    req = parse_body(await request.body(), ClassifyRequest)
    check_model(engine, req.model)
    info = await engine.model_info() if engine.args.is_embedding else None
    check_classifier(engine.args.is_embedding, info)
    inputs = embedding_inputs(req.input)
    batch = await embed_within_deadline(request, engine, inputs, started)
    labels = class_labels(info.model_path, batch.vectors.shape[1])
    usage = {
        "prompt_tokens": batch.prompt_tokens,
        "total_tokens": batch.prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }
    return JSONResponse(
        {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": engine.served_name,
            "data": classification_data(batch.vectors, labels),
            "usage": usage,
        }
    )
