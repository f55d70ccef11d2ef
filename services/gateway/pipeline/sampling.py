"""Request-body parsing and sampling-parameter validation shared by the REST and gRPC APIs."""
from __future__ import annotations

import json
import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from radixserve.v1 import common_pb2
from radixserve.gateway.api.errors import bad_request, not_supported

UINT64_MASK = (1 << 64) - 1
MAX_TOP_LOGPROBS = 20
MAX_PENALTY = 2.0  # frequency and presence penalties lie in [-2, 2], the repetition penalty in (0, 2]
MAX_LOGIT_BIAS = 100.0
MAX_INT32 = (1 << 31) - 1
MAX_TOKEN_ID = MAX_INT32

SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
PYTHON_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")  # in some pydantic messages: show the bare name
Body = TypeVar("Body", bound=BaseModel)


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """JSON bytes to a request model; every failure is a 400 in OpenAI's error shape."""
    try:
        text = raw.decode("utf-8")  # strictly: json.loads(bytes) would let encoded surrogates through
        data = json.loads(text)
    except UnicodeDecodeError:
        raise bad_request("Invalid JSON body: not UTF-8 text", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"Invalid JSON body: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("Invalid JSON body: nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object", code="invalid_json")
    if SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(data):
        raise bad_request("Invalid JSON body: a string holds an unpaired UTF-16 surrogate escape", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def _has_lone_surrogate(data) -> bool:
    """Whether a string anywhere in data is not encodable as UTF-8 (json.loads lets "\\ud800" through)."""
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending += item.keys()
            pending += item.values()
        elif isinstance(item, list):
            pending += item
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def validation_error(errors) -> Exception:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    detail = PYTHON_CLASS.sub(r"\1", str(first.get("msg", "invalid value"))).removeprefix("Value error, ")
    message = f"{param}: {detail}" if param else detail
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
                   logprobs: bool = False, frequency_penalty: float | None = None,
                   presence_penalty: float | None = None, repetition_penalty: float | None = None,
                   logit_bias: dict[str, float] | dict[int, float] | None = None, min_tokens: int | None = None,
                   min_tokens_param: str = "min_tokens") -> common_pb2.SamplingParams:
    """Validated SamplingParams; max_new_tokens stays 0 when the client left the length open.

    logit_bias token ids are checked to be integers >= 0 only (the vocabulary may be unknown here);
    the executor ignores ids beyond the model's vocabulary.
    """
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
    if max_tokens is not None and not 1 <= max_tokens <= MAX_INT32:
        raise bad_request(f"{max_tokens_param} must be between 1 and {MAX_INT32}, got {max_tokens}",
                          param=max_tokens_param, code="invalid_value")
    if top_k > MAX_INT32:
        raise bad_request(f"top_k must be at most {MAX_INT32}, got {top_k}", param="top_k", code="invalid_value")
    bad_stop = next((t for t in stop_token_ids or () if not 0 <= t <= MAX_TOKEN_ID), None)
    if bad_stop is not None:
        raise bad_request(f"stop_token_ids must be token ids (non-negative integers), got {bad_stop}",
                          param="stop_token_ids", code="invalid_value")
    top_logprobs = top_logprobs or 0
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs",
                          code="invalid_value")
    sampling = common_pb2.SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, max_new_tokens=max_tokens or 0,
        stop_token_ids=stop_token_ids or [], ignore_eos=ignore_eos, return_logprob=logprobs,
        top_logprobs_num=top_logprobs if logprobs else 0,
        **_penalty_options(frequency_penalty, presence_penalty, repetition_penalty),
        logit_bias=_logit_bias(logit_bias), min_new_tokens=_min_tokens(min_tokens, min_tokens_param, max_tokens))
    if seed is not None:
        sampling.seed = seed & UINT64_MASK
    return sampling


def penalty_args(body) -> dict:
    """build_sampling's penalty, logit_bias and min_tokens arguments from an OpenAI request body."""
    return {"frequency_penalty": body.frequency_penalty, "presence_penalty": body.presence_penalty,
            "repetition_penalty": body.repetition_penalty, "logit_bias": body.logit_bias,
            "min_tokens": body.min_tokens}


def _penalty_options(frequency: float | None, presence: float | None, repetition: float | None) -> dict:
    for value, name in ((frequency, "frequency_penalty"), (presence, "presence_penalty")):
        if value is not None and not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise bad_request(f"{name} must be between -2 and 2, got {value}", param=name, code="invalid_value")
    if repetition is not None and not 0.0 < repetition <= MAX_PENALTY:
        raise bad_request(f"repetition_penalty must be in (0, 2], got {repetition}", param="repetition_penalty",
                          code="invalid_value")
    return {"frequency_penalty": frequency or 0.0, "presence_penalty": presence or 0.0,
            "repetition_penalty": repetition or 1.0}


def _logit_bias(bias: dict[str, float] | dict[int, float] | None) -> dict[int, float]:
    checked: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token <= MAX_TOKEN_ID:
            raise bad_request(f"logit_bias keys must be token ids (non-negative integers), got {key!r}",
                              param="logit_bias", code="invalid_value")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise bad_request(f"logit_bias values must be between -100 and 100, got {value} for token {key}",
                              param="logit_bias", code="invalid_value")
        checked[token] = value
    return checked


def _min_tokens(min_tokens: int | None, param: str, max_tokens: int | None) -> int:
    if min_tokens is None:
        return 0
    if not 0 <= min_tokens <= MAX_INT32:
        raise bad_request(f"{param} must be between 0 and {MAX_INT32}, got {min_tokens}", param=param,
                          code="invalid_value")
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(f"{param} ({min_tokens}) must not exceed the maximum number of tokens ({max_tokens})",
                          param=param, code="invalid_value")
    return min_tokens


def reject_unsupported(*, n: int | None = 1) -> None:
    if n is not None and n != 1:
        raise not_supported("n other than 1", param="n")
