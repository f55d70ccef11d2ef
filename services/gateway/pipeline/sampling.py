"""Request-body parsing, and the REST APIs' sampling options made into SamplingParams and StoppingCriteria."""

from __future__ import annotations

import json
import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from radixserve.common.sampling import (
    MAX_INT32,
    MAX_TOP_LOGPROBS,
    UINT64_MASK,
    SamplingDefaults,
    SamplingError,
    SamplingParams,
    StoppingCriteria,
)
from radixserve.detokenizer.stop_strings import MAX_STOP_REGEXES, compile_stop_regex
from radixserve.gateway.api.errors import bad_request, not_supported

SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
PYTHON_CLASS = re.compile(
    r"<class '(?:[\w.]+\.)?(\w+)'>"
)  # in some pydantic messages: show the bare name
Body = TypeVar("Body", bound=BaseModel)
# The length of a /v1/completions answer without max_tokens (OpenAI's, SGLang's and vLLM's default) and of
# a native /generate one without max_new_tokens (SGLang's), unless the server sets max_new_tokens.
COMPLETION_DEFAULT_MAX_TOKENS = 16
NATIVE_DEFAULT_MAX_NEW_TOKENS = 128
NO_DEFAULTS = SamplingDefaults()


def server_defaults(model: SamplingDefaults, args) -> SamplingDefaults:
    """The defaults for what requests leave out: the model's generation config (--generation-config),
    then --preferred-sampling-params, then --override-generation-config, a later one winning per field.
    The flags were checked at parse time (args.check_sampling_defaults)."""
    preferred = SamplingDefaults.from_json(
        args.preferred_sampling_params, "--preferred-sampling-params"
    )
    override = SamplingDefaults.from_json(
        args.override_generation_config, "--override-generation-config"
    )
    return model.layered(preferred).layered(override)


def _default(value, server_default, api_default):
    """A request's value; left out: the server's default, else the API's."""
    if value is not None:
        return value
    return api_default if server_default is None else server_default


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


def stop_regexes(value: str | list[str] | None, param: str = "stop_regex") -> list[str]:
    """SGLang's stop_regex as a list, each pattern checked to compile as the detokenizer will (a 400 names
    the first bad one)."""
    patterns = stop_list(value)
    if len(patterns) > MAX_STOP_REGEXES:
        raise bad_request(
            f"{param} may hold at most {MAX_STOP_REGEXES} patterns, got {len(patterns)}",
            param=param,
            code="invalid_value",
        )
    for pattern in patterns:
        try:
            compile_stop_regex(pattern)
        except ValueError as e:
            raise bad_request(f"{param}: {e}", param=param, code="invalid_value") from None
    return patterns


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
    prompt_logprob_start: int = -1,
    prompt_top_logprobs: int = 0,
    token_ids_logprob: list[int] | None = None,
    defaults: SamplingDefaults = NO_DEFAULTS,
) -> tuple[SamplingParams, StoppingCriteria]:
    """A REST request's sampling options and stop conditions, checked: for what it left out the server's
    defaults (server_defaults), else the API's (temperature 1); max_new_tokens stays 0 when the client
    left the length open (the caller's GenerationInput.default_max_new_tokens decides it).
    prompt_logprob_start -1: no prompt logprobs (their count is checked against the prompt later).

    logit_bias token ids are checked to be integers >= 0 only (the vocabulary may be unknown here);
    the executor ignores ids beyond the model's vocabulary.
    """
    sampling = SamplingParams(
        temperature=_default(temperature, defaults.temperature, 1.0),
        top_p=_default(top_p, defaults.top_p, 1.0),
        top_k=_default(top_k, defaults.top_k, 0),
        min_p=_default(min_p, defaults.min_p, 0.0),
        seed=None if seed is None else seed & UINT64_MASK,
        return_logprob=logprobs,
        top_logprobs_num=top_logprobs or 0,
        frequency_penalty=_default(frequency_penalty, defaults.frequency_penalty, 0.0),
        presence_penalty=_default(presence_penalty, defaults.presence_penalty, 0.0),
        repetition_penalty=_default(repetition_penalty, defaults.repetition_penalty, 1.0),
        logit_bias=_logit_bias_ids(logit_bias),
        prompt_logprob_start=prompt_logprob_start,
        prompt_top_logprobs_num=prompt_top_logprobs,
        token_ids_logprob=tuple(token_ids_logprob or ()),
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


def prompt_logprob_args(
    *, prompt_logprobs: int | None, stream: bool, echo_logprobs: int | None = None
) -> dict:
    """build_sampling's prompt logprob arguments for an OpenAI body: vLLM's prompt_logprobs (this many
    alternatives per prompt token; refused with stream, as vLLM does) and, on /v1/completions, the
    logprobs of an echo (echo_logprobs: its logprobs field)."""
    if prompt_logprobs is not None:
        if stream:
            raise bad_request(
                "prompt_logprobs is not available when stream is true", param="prompt_logprobs"
            )
        if not 0 <= prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(
                f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {prompt_logprobs}",
                param="prompt_logprobs",
                code="invalid_value",
            )
    asked = [k for k in (prompt_logprobs, echo_logprobs) if k is not None]
    if not asked:
        return {}
    return {"prompt_logprob_start": 0, "prompt_top_logprobs": max(asked)}


def checked_prompt_logprobs(sampling: SamplingParams, prompt_len: int) -> SamplingParams:
    """sampling, or a 400 when its prompt logprobs do not fit a prompt of prompt_len tokens."""
    try:
        return sampling.check_prompt_logprobs(prompt_len)
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
