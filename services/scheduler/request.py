"""Plain data of the scheduler core: requests and events (its steps are common/step.py's)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: the grammar module loads xgrammar
    from radixserve.scheduler.grammar import RequestGrammar
    from radixserve.scheduler.ngram_proposer import NgramProposer
    from radixserve.scheduler.radix_cache import TreeNode
    from radixserve.v1.common_pb2 import TokenLogprob, TraceContext

from radixserve.common.multimodal import PromptImage, cache_key_ids
from radixserve.common.sampling import SamplingParams, StoppingCriteria


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
    stopping: StoppingCriteria
    # Handed to the executor untouched.
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Structured output: the grammar state that has accepted every token of output_ids; None when
    # unconstrained or finished.
    grammar: RequestGrammar | None = None

    # When the request reached the scheduler (time.monotonic()), for queue-time metrics and spans.
    arrival_time: float = 0.0
    # The caller's W3C trace context; None: not traced.
    trace_context: TraceContext | None = None
    # The prompt's images (sent to the executor with every NewRequest of it) and, for M-RoPE models,
    # its [3, prompt length] positions flattened and their delta; see SchedulerGenerateRequest.
    images: list[PromptImage] = field(default_factory=list)
    mrope_positions: list[int] = field(default_factory=list)
    mrope_position_delta: int = 0
    # The LoRA adapter it runs with ("": the base model); its prefix-cache namespace too.
    lora_name: str = ""

    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Prompt logprobs (sampling.prompt_logprob_start): those returned and not yet sent, and the first
    # prompt position no planned step computes them at (see prompt_logprobs.py).
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprob_next: int = 0
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
    # Speculative decoding: its n-gram drafter (made at its first decode, brought up to date with
    # seq before each draft), and the draft tokens of its step in flight (verified by that step).
    proposer: NgramProposer | None = None
    drafts_inflight: list[int] = field(default_factory=list)
    draft_parents_inflight: list[int] = field(default_factory=list)  # a tree's (empty: a chain)
    # EAGLE: the draft the executor proposed with its last sampled token (its next step's draft_ids).
    proposed_draft_ids: list[int] = field(default_factory=list)
    proposed_draft_parents: list[int] = field(default_factory=list)  # a tree's (empty: a chain)

    @property
    def seq(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def cache_seq(self) -> list[int]:
        """seq as the prefix cache keys it: each image's placeholder positions by the image's hash."""
        if not self.images:
            return self.seq
        return cache_key_ids(self.prompt_ids, self.images) + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.stopping.max_new_tokens - len(self.output_ids))

    @property
    def busy(self) -> bool:
        """Whether steps in flight still write this request's KV."""
        return bool(self.inflight or self.chunks_inflight)


@dataclass
class RequestEvent:
    """What one step (or an abort) produced for one request."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # on the first token's event
    finish_reason: FinishReason | None = None
    matched_stop_token_id: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    """The core's counters (GetInfo, metrics)."""

    pool_tokens: int
    free: int
    cached: int  # evictable: held only by the prefix cache
    in_use: int  # held by running requests, their locked cache paths included
    running: int
    waiting: int
    total_prompt_tokens: int
    total_cached_prompt_tokens: int
    num_retractions: int
    # Speculative decoding (scheduler/speculation.py's SpecStats).
    spec_verify_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
