"""Request-body parsing and sampling-parameter validation shared by the REST and gRPC APIs."""
from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from radixserve.v1 import common_pb2
from services.gateway.errors import bad_request, not_supported

UINT64_MASK = (1 << 64) - 1
MAX_TOP_LOGPROBS = 20

Body = TypeVar("Body", bound=BaseModel)


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """JSON bytes to a request model; every failure is a 400 in OpenAI's error shape."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"Invalid JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def validation_error(errors) -> Exception:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return bad_request(message, param=param, code="invalid_value")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def build_sampling(*, temperature: float | None, top_p: float | None, top_k: int | None, min_p: float | None,
                   seed: int | None, max_tokens: int | None, stop_token_ids: list[int] | None,
                   ignore_eos: bool, max_tokens_param: str = "max_tokens", top_logprobs: int | None = None,
                   logprobs: bool = False) -> common_pb2.SamplingParams:
    """Validated SamplingParams; max_new_tokens stays 0 when the client left the length open."""
    temperature = 1.0 if temperature is None else temperature
    top_p = 1.0 if top_p is None else top_p
    top_k = 0 if top_k is None or top_k == -1 else top_k
    min_p = 0.0 if min_p is None else min_p
    if not 0.0 <= temperature <= 2.0:
        raise bad_request(f"temperature must be between 0 and 2, got {temperature}", param="temperature",
                          code="invalid_value")
    if not 0.0 < top_p <= 1.0:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}", param="top_p", code="invalid_value")
    if top_k < 0:
        raise bad_request(f"top_k must be -1 (disabled) or at least 1, got {top_k}", param="top_k",
                          code="invalid_value")
    if not 0.0 <= min_p <= 1.0:
        raise bad_request(f"min_p must be in [0, 1], got {min_p}", param="min_p", code="invalid_value")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{max_tokens_param} must be at least 1, got {max_tokens}", param=max_tokens_param,
                          code="invalid_value")
    top_logprobs = top_logprobs or 0
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs",
                          code="invalid_value")
    sampling = common_pb2.SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, max_new_tokens=max_tokens or 0,
        stop_token_ids=stop_token_ids or [], ignore_eos=ignore_eos, return_logprob=logprobs,
        top_logprobs_num=top_logprobs if logprobs else 0)
    if seed is not None:
        sampling.seed = seed & UINT64_MASK
    return sampling


def reject_unsupported(*, n: int | None = 1, presence_penalty: float | None = None,
                       frequency_penalty: float | None = None, repetition_penalty: float | None = None,
                       logit_bias: dict | None = None) -> None:
    if n is not None and n != 1:
        raise not_supported("n other than 1", param="n")
    if presence_penalty:
        raise not_supported("presence_penalty", param="presence_penalty")
    if frequency_penalty:
        raise not_supported("frequency_penalty", param="frequency_penalty")
    if repetition_penalty is not None and repetition_penalty != 1.0:
        raise not_supported("repetition_penalty", param="repetition_penalty")
    if logit_bias:
        raise not_supported("logit_bias", param="logit_bias")
