"""Request-body parsing, and the REST APIs' sampling options made into SamplingParams and StoppingCriteria."""

from __future__ import annotations

import json
import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from radixserve.common.sampling import (
    MAX_INT32,
    UINT64_MASK,
    SamplingError,
    SamplingParams,
    StoppingCriteria,
)
from radixserve.gateway.api.errors import bad_request, not_supported

SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
PYTHON_CLASS = re.compile(
    r"<class '(?:[\w.]+\.)?(\w+)'>"
)  # in some pydantic messages: show the bare name
Body = TypeVar("Body", bound=BaseModel)


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """JSON bytes to a request model; every failure is a 400 in OpenAI's error shape."""
    try:
        text = raw.decode(
            "utf-8"
        )  # strictly: json.loads(bytes) would let encoded surrogates through
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
        raise bad_request(
            "Invalid JSON body: a string holds an unpaired UTF-16 surrogate escape",
            code="invalid_json",
        )
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
    unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:  # in OpenAI's words, naming the first (the path, for a nested one)
        param = ".".join(str(part) for part in unknown[0]["loc"])
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    detail = PYTHON_CLASS.sub(r"\1", str(first.get("msg", "invalid value"))).removeprefix(
        "Value error, "
    )
    message = f"{param}: {detail}" if param else detail
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return bad_request(message, param=param, code="invalid_value")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def build_sampling(
    *,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    seed: int | None,
    max_tokens: int | None,
    stop_token_ids: list[int] | None,
    ignore_eos: bool,
    max_tokens_param: str = "max_tokens",
    top_logprobs: int | None = None,
    logprobs: bool = False,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    repetition_penalty: float | None = None,
    logit_bias: dict[str, float] | dict[int, float] | None = None,
    min_tokens: int | None = None,
    min_tokens_param: str = "min_tokens",
) -> tuple[SamplingParams, StoppingCriteria]:
    """A REST request's sampling options and stop conditions, with the API's defaults for what it left out
    (temperature 1), checked; max_new_tokens stays 0 when the client left the length open.

    logit_bias token ids are checked to be integers >= 0 only (the vocabulary may be unknown here);
    the executor ignores ids beyond the model's vocabulary.
    """
    sampling = SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,
        min_p=min_p or 0.0,
        seed=None if seed is None else seed & UINT64_MASK,
        return_logprob=logprobs,
        top_logprobs_num=top_logprobs or 0,
        frequency_penalty=frequency_penalty or 0.0,
        presence_penalty=presence_penalty or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        logit_bias=_logit_bias_ids(logit_bias),
    )
    stopping = StoppingCriteria(
        max_new_tokens=0 if max_tokens is None else max_tokens,
        stop_token_ids=tuple(stop_token_ids or ()),
        ignore_eos=ignore_eos,
        min_new_tokens=0 if min_tokens is None else min_tokens,
    )
    checked(sampling, stopping, max_tokens_param, min_tokens_param)
    if max_tokens == 0:  # stopping's 0 means "not given": a client that gave 0 asked for nothing
        raise bad_request(
            f"{max_tokens_param} must be between 1 and {MAX_INT32}, got 0",
            param=max_tokens_param,
            code="invalid_value",
        )
    if not logprobs:
        sampling.top_logprobs_num = 0
    return sampling, stopping


def checked(
    sampling: SamplingParams,
    stopping: StoppingCriteria,
    max_tokens_param: str = "max_new_tokens",
    min_tokens_param: str = "min_new_tokens",
) -> tuple[SamplingParams, StoppingCriteria]:
    """The pair, or a 400 naming the first option out of range."""
    try:
        return sampling.check(), stopping.check(max_tokens_param, min_tokens_param)
    except SamplingError as e:
        raise bad_request(str(e), param=e.param, code="invalid_value") from None


def penalty_args(body) -> dict:
    """build_sampling's penalty, logit_bias and min_tokens arguments from an OpenAI request body."""
    return {
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        "repetition_penalty": body.repetition_penalty,
        "logit_bias": body.logit_bias,
        "min_tokens": body.min_tokens,
    }


def _logit_bias_ids(bias: dict[str, float] | dict[int, float] | None) -> dict[int, float]:
    """logit_bias with its JSON keys as token ids (their range is SamplingParams.check's)."""
    ids: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            ids[int(key)] = value
        except ValueError:
            raise bad_request(
                f"logit_bias keys must be token ids (non-negative integers), got {key!r}",
                param="logit_bias",
                code="invalid_value",
            ) from None
    return ids


def reject_unsupported(*, n: int | None = 1) -> None:
    if n is not None and n != 1:
        raise not_supported("n other than 1", param="n")
