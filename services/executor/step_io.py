"""Plain-Python step input/output of the ModelRunner (server.py maps protobuf to these)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # <= 0 or >= 1: disabled
    top_k: int = 0  # <= 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 (or <= 0): disabled
    min_new_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Besides the model's EOS ids (unless ignore_eos), what min_new_tokens holds back.
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class NewRequest:
    request_id: str
    input_ids: list[int]
    new_slots: list[int]
    prefix_slots: list[int] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    sample: bool = True
    token_bitmask: bytes = b""  # non-empty: only tokens whose bit is set may be sampled this step
    penalty_prompt_ids: list[int] = field(default_factory=list)  # the whole prompt, for repetition_penalty


@dataclass
class ContinuingRequest:
    request_id: str
    new_slots: list[int]
    input_ids: list[int] = field(default_factory=list)  # empty: the token sampled last step
    sample: bool = True
    token_bitmask: bytes = b""


@dataclass
class StepInput:
    step_id: int = 0
    finished_request_ids: list[str] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    continuing_requests: list[ContinuingRequest] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    token_id: int
    logprob: float | None = None  # set when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StepOutput:
    step_id: int
    outputs: list[RequestOutput]
    forward_ms: float
    logits: Any = None  # float32 [len(outputs), vocab] tensor the outputs were sampled from


class StepError(ValueError):
    """The step request is invalid (unknown id, bad slot, length mismatch); nothing was run."""
