"""One executor step, as the scheduler plans it and the executor runs it (mirrors ExecutorStepRequest and
ExecutorStepResponse; step_convert.py maps them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radixserve.v1 import common_pb2
from radixserve.common.multimodal import PromptImage
from radixserve.common.sampling import SamplingParams, StoppingCriteria


@dataclass
class PromptLogprobRange:
    """Which positions of a step's input_ids get the logprob of the prompt token after them (see
    ExecutorPromptLogprobRange): input_ids[start : start + count], whose targets are the ids after
    each, with next_token_id after the last input id (-1: none, the range must end before it)."""

    start: int
    count: int
    next_token_id: int = -1
    top_logprobs_num: int = 0

    def targets(self, input_ids: list[int]) -> list[int]:
        """The prompt token after each position of the range."""
        return (list(input_ids) + [self.next_token_id])[
            self.start + 1 : self.start + self.count + 1
        ]


@dataclass
class NewRequest:
    """A request the executor has not seen (or has dropped): its uncached tokens and all its slots."""

    request_id: str
    input_ids: list[int]
    new_slots: list[int]
    prefix_slots: list[int] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    sample: bool = True  # False when input_ids is the first chunk of a longer prefill
    token_bitmask: bytes = b""  # non-empty: only tokens whose bit is set may be sampled this step
    # The whole sequence so far (prompt, then tokens generated before a retraction), sent only when the
    # repetition penalty is on: the penalty sees tokens the executor never received.
    penalty_prompt_ids: list[int] = field(default_factory=list)
    stopping: StoppingCriteria = field(default_factory=StoppingCriteria)
    generated_tokens: int = (
        0  # output tokens generated before a retraction (count toward min_new_tokens)
    )
    trace_context: common_pb2.TraceContext | None = None  # the request's span; None: not traced
    prompt_logprobs: PromptLogprobRange | None = None
    # The prompt's images (offsets from the prompt's start, cached prefix included); see
    # ExecutorNewRequest.images.
    images: list[PromptImage] = field(default_factory=list)
    # M-RoPE models: the prompt's [3, prompt length] positions flattened row by row (empty: none), and
    # the delta of the positions past the prompt.
    mrope_positions: list[int] = field(default_factory=list)
    mrope_position_delta: int = 0
    lora_name: str = ""  # the LoRA adapter it runs with ("": the base model)


@dataclass
class ContinuingRequest:
    """A request the executor already holds state for."""

    request_id: str
    new_slots: list[int]
    input_ids: list[int] = field(default_factory=list)  # empty: decode the token sampled last step
    sample: bool = True  # False for a prefill chunk that is not the last
    token_bitmask: bytes = b""
    prompt_logprobs: PromptLogprobRange | None = None
    # Speculative decoding: tokens drafted after the last sampled one, verified this step; new_slots
    # then holds 1 + len(draft_ids) slots (that token's, then each draft token's).
    draft_ids: list[int] = field(default_factory=list)
    # Tree drafts: each draft token's parent (-1: the token sampled last step; else an earlier
    # draft's index). Empty: a chain.
    draft_parents: list[int] = field(default_factory=list)


@dataclass
class StepInput:
    """One step: the diff since the previous one."""

    step_id: int = 0
    finished_request_ids: list[str] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    continuing_requests: list[ContinuingRequest] = field(default_factory=list)

    @property
    def is_prefill(self) -> bool:
        """Whether the step runs prompt tokens (a new request, or a later chunk of a prefill)."""
        return bool(self.new_requests) or any(c.input_ids for c in self.continuing_requests)

    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.new_requests] + [
            r.request_id for r in self.continuing_requests
        ]


@dataclass
class SampledToken:
    """The token sampled for one request."""

    request_id: str
    token_id: int
    logprob: float | None = None  # set when the request asked for logprobs
    top_logprobs: list[tuple[int, float]] = field(
        default_factory=list
    )  # (token id, logprob), most likely first
    # (token id, logprob) of each of sampling.token_ids_logprob, in that order
    token_ids_logprobs: list[tuple[int, float]] = field(default_factory=list)
    # Speculative decoding: the draft tokens accepted this step, emitted before token_id, and their
    # logprobs (when the request asked for logprobs).
    accepted_draft_ids: list[int] = field(default_factory=list)
    accepted_draft_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    # Speculative decoding with a draft head (EAGLE, EAGLE3): the tokens the executor drafts after
    # token_id, for the request's next step (its draft_ids).
    proposed_draft_ids: list[int] = field(default_factory=list)
    proposed_draft_parents: list[int] = field(default_factory=list)  # a tree's (empty: a chain)

    def token_logprob(self) -> common_pb2.TokenLogprob | None:
        if self.logprob is None:
            return None
        return token_logprob(
            self.token_id, self.logprob, self.top_logprobs, requested=self.token_ids_logprobs
        )


def token_logprob(
    token_id: int,
    logprob: float,
    top: list[tuple[int, float]],
    rank: int = 0,
    requested: list[tuple[int, float]] = (),
) -> common_pb2.TokenLogprob:
    """The message of one token's logprob (sampled or prompt) with its top alternatives; rank 0:
    not computed; requested: the logprobs of sampling.token_ids_logprob."""
    return common_pb2.TokenLogprob(
        token_id=token_id,
        logprob=logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in top],
        rank=rank,
        token_ids_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in requested],
    )


@dataclass
class PromptLogprobs:
    """The logprobs one step computed for a PromptLogprobRange of one request, in prompt order."""

    request_id: str
    logprobs: list[common_pb2.TokenLogprob]  # token_id: the prompt token after each position


@dataclass
class StepOutput:
    """The result of one step: a SampledToken per sampling request, new requests first."""

    step_id: int
    outputs: list[SampledToken]
    forward_ms: float
    logits: Any = None  # executor only: the float32 [len(outputs), vocab] tensor the outputs were sampled from
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


class StepError(ValueError):
    """The executor refuses the step (unknown id, bad slot, length mismatch); nothing was run."""
