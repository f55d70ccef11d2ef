"""Plain data of the scheduler core: requests, step plans, step outputs and events."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: the grammar module loads xgrammar
    from radixserve.scheduler.grammar import RequestGrammar
    from radixserve.scheduler.radix_cache import TreeNode
    from radixserve.v1.common_pb2 import TokenLogprob, TraceContext


class FinishReason(enum.IntEnum):
    # Same numbers as radixserve.v1.FinishReason.
    STOP = 1
    LENGTH = 2
    ABORT = 3


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0  # EOS and stop tokens do not finish it before this many output tokens
    # Handed to the executor untouched (the server puts the SamplingParams proto here).
    sampling: Any = None
    # Structured output: the grammar state that has accepted every token of output_ids; None when
    # unconstrained or finished.
    grammar: RequestGrammar | None = None

    # When the request reached the scheduler (time.monotonic()), for queue-time metrics and spans.
    arrival_time: float = 0.0
    # The caller's W3C trace context; None: not traced.
    trace_context: TraceContext | None = None

    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # KV slots of seq[:len(slots)]; the first prefix_len of them belong to the locked cache path.
    # While a prefill is chunked, len(slots) is how far it has been planned.
    slots: list[int] = field(default_factory=list)
    prefix_len: int = 0
    last_node: TreeNode | None = None  # the end of the locked cache path
    # Prompt tokens served from the cache at the first admission (reported as usage).
    cached_tokens: int = 0
    admitted_once: bool = False
    admit_seq: int = 0  # admission order; retraction picks the newest
    status: Status = Status.WAITING
    # Planned steps not yet updated that sample a token for this request.
    inflight: int = 0
    # Planned steps not yet updated that run a prefill chunk of it without sampling.
    chunks_inflight: int = 0

    @property
    def seq(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.max_new_tokens - len(self.output_ids))

    @property
    def busy(self) -> bool:
        """Whether steps in flight still write this request's KV."""
        return bool(self.inflight or self.chunks_inflight)


@dataclass
class NewRequestPlan:
    request_id: str
    input_ids: list[int]
    prefix_slots: list[int]
    new_slots: list[int]
    sampling: Any = None
    sample: bool = True  # False when input_ids is the first chunk of a longer prefill
    token_bitmask: bytes = b""  # non-empty: the tokens the executor may sample this step
    # The request's whole sequence (prompt, then tokens generated before a retraction), and how many of
    # those are generated tokens; plan_to_proto adjusts the sampling options that depend on them.
    seq_ids: list[int] = field(default_factory=list)
    num_output_ids: int = 0
    trace_context: Any = None  # the request's TraceContext proto for the executor; None: not traced


@dataclass
class ContinuingRequestPlan:
    request_id: str
    new_slots: list[int]
    input_ids: list[int] = field(default_factory=list)  # empty: decode the last sampled token
    sample: bool = True  # False for a prefill chunk that is not the last
    token_bitmask: bytes = b""


@dataclass
class StepPlan:
    """Mirrors ExecutorStepRequest."""
    step_id: int
    finished_request_ids: list[str] = field(default_factory=list)
    new_requests: list[NewRequestPlan] = field(default_factory=list)
    continuing_requests: list[ContinuingRequestPlan] = field(default_factory=list)

    @property
    def is_prefill(self) -> bool:
        """Whether the step runs prompt tokens (a new request, or a later chunk of a prefill)."""
        return bool(self.new_requests) or any(c.input_ids for c in self.continuing_requests)

    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.new_requests] + [r.request_id for r in self.continuing_requests]


@dataclass
class SampledToken:
    """One sampled token, as ExecutorRequestOutput."""
    request_id: str
    token_id: int
    logprob: Any = None


@dataclass
class RequestEvent:
    """What one step (or an abort) produced for one request."""
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop_token_id: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
