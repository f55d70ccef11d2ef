"""Speculative decoding on the scheduler's side (docs/speculative.md): the n-gram settings from the
flags, which requests may speculate, how many tokens a request drafts, and the acceptance counters.
Plain Python, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from radixserve.common.config import SchedulerConfig
from radixserve.scheduler.ngram_proposer import NgramParams, NgramProposer

if (
    TYPE_CHECKING
):  # (the flag check imports this module: no torch or protobuf before the executor's)
    from radixserve.scheduler.request import Request


def ngram_params(config: SchedulerConfig) -> NgramParams | None:
    """The n-gram drafter's settings, None when speculation is off; ValueError for settings that do
    not fit (unset flags take NgramParams' defaults)."""
    if config.speculative_algorithm is None:
        return None
    if config.speculative_algorithm != "NGRAM":
        raise ValueError(
            f"--speculative-algorithm {config.speculative_algorithm}: not built yet (NGRAM only)"
        )
    defaults = NgramParams()
    num_draft_tokens = config.speculative_num_draft_tokens
    if num_draft_tokens is not None and num_draft_tokens < 2:
        raise ValueError(
            "--speculative-num-draft-tokens counts the last verified token too: it must be at "
            f"least 2 (got {num_draft_tokens})"
        )

    def pick(value, default):
        return default if value is None else value

    return NgramParams(
        min_match_window_size=pick(
            config.speculative_ngram_min_match_window_size, defaults.min_match_window_size
        ),
        max_match_window_size=pick(
            config.speculative_ngram_max_match_window_size, defaults.max_match_window_size
        ),
        max_draft_tokens=defaults.max_draft_tokens
        if num_draft_tokens is None
        else num_draft_tokens - 1,
        history_window=pick(config.speculative_ngram_history_window, defaults.history_window),
    )


def may_speculate(req: Request) -> bool:
    """Whether req's tokens may be drafted: not with a grammar, nor with sampling options that see
    each generated token (penalties, logit_bias, a minimum length), which plain decoding serves."""
    s = req.sampling
    return (
        req.grammar is None
        and not s.frequency_penalty
        and not s.presence_penalty
        and s.repetition_penalty in (0.0, 1.0)
        and not s.logit_bias
        and len(req.output_ids) >= req.stopping.min_new_tokens
    )


def draft_for(req: Request, params: NgramParams, context_length: int) -> list[int]:
    """req's draft for its next step (its proposer brought up to date with its tokens first)."""
    if req.proposer is None:
        req.proposer = NgramProposer(params)
    seq_len = req.seq_len
    if len(req.proposer) < seq_len:
        req.proposer.extend(req.seq[len(req.proposer) :])
    limit = min(params.max_draft_tokens, req.remaining_new_tokens - 1, context_length - seq_len - 1)
    return req.proposer.propose(limit) if limit > 0 else []


@dataclass
class SpecStats:
    """Acceptance counters: verify steps of requests (one per request and step that carried a
    draft), the draft tokens they proposed and accepted."""

    verify_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    def add(self, drafted: int, accepted: int) -> None:
        self.verify_steps += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted

    @property
    def accept_length(self) -> float:
        """Average tokens a verify step emits per request: accepted drafts + the target's own."""
        if not self.verify_steps:
            return 0.0
        return 1.0 + self.accepted_tokens / self.verify_steps
