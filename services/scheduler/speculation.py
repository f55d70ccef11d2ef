"""Speculative decoding on the scheduler's side (docs/speculative.md): the n-gram or EAGLE settings
from the flags, which requests may speculate, how many tokens a request drafts, and the acceptance
counters. Plain Python, no I/O.

NGRAM drafts here (ngram_proposer.py). EAGLE / EAGLE3 (a draft head) and STANDALONE (a small draft
model) draft on the executor, after each step that samples: a request's step output carries the
draft's proposal (proposed_draft_ids), which its next step sends back as draft_ids, with a slot for
each, exactly like an n-gram draft."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from radixserve.common.config import DEFAULT_EAGLE_STEPS, SchedulerConfig
from radixserve.common.draft_tree import MAX_TREE_DRAFT_TOKENS
from radixserve.scheduler.ngram_proposer import NgramParams, NgramProposer

if (
    TYPE_CHECKING
):  # (the flag check imports this module: no torch or protobuf before the executor's)
    from radixserve.scheduler.request import Request


# Drafted on the executor (EagleParams): draft heads, and a standalone draft model.
EAGLE_ALGORITHMS = ("EAGLE", "EAGLE3", "STANDALONE")


@dataclass(frozen=True)
class EagleParams:
    """A draft head's (or STANDALONE draft model's) settings: the executor loads it and proposes
    num_steps tokens per step (topk 1: a chain), or, with topk > 1, a tree of num_draft_tokens - 1
    tokens picked from num_steps rounds that each keep the topk likeliest branches."""

    algorithm: str  # EAGLE | EAGLE3 | STANDALONE
    draft_model_path: str
    num_steps: int
    topk: int = 1
    num_draft_tokens: int | None = None  # the root included, as SGLang counts; topk > 1 only

    @property
    def max_draft_tokens(self) -> int:
        return self.num_steps if self.topk == 1 else self.num_draft_tokens - 1


def speculation_params(config: SchedulerConfig) -> NgramParams | EagleParams | None:
    """The drafter's settings (n-gram or EAGLE), None when speculation is off; ValueError for
    settings that do not fit."""
    algorithm = config.speculative_algorithm
    if algorithm is None:
        return None
    limit = config.speculative_disable_by_batch_size
    if limit is not None and limit < 1:
        raise ValueError(f"--speculative-disable-by-batch-size must be at least 1 (got {limit})")
    num_draft_tokens = config.speculative_num_draft_tokens
    if num_draft_tokens is not None and num_draft_tokens < 2:
        raise ValueError(
            "--speculative-num-draft-tokens counts the last verified token too: it must be at "
            f"least 2 (got {num_draft_tokens})"
        )
    params = eagle_params(config) if algorithm in EAGLE_ALGORITHMS else ngram_params(config)
    # (The executor's settings carry no page size; the scheduler's, which place the slots, do.)
    if drafts_trees(params) and getattr(config, "page_size", 1) > 1:
        raise ValueError(
            "tree drafts (--speculative-eagle-topk or --speculative-ngram-max-bfs-breadth above 1) "
            "need --page-size 1: the accepted path's KV stays at the slots it was drafted in, "
            "which pages would not keep in order"
        )
    return params


def eagle_params(config: SchedulerConfig) -> EagleParams:
    """EAGLE / EAGLE3 / STANDALONE settings: a draft head's (model's) folder, a chain of
    --speculative-num-steps drafts."""
    algorithm = config.speculative_algorithm
    if not config.speculative_draft_model_path:
        raise ValueError(
            f"--speculative-algorithm {algorithm} needs --speculative-draft-model-path (the draft "
            f"{'model' if algorithm == 'STANDALONE' else 'head'}'s folder)"
        )
    topk = config.speculative_eagle_topk or 1
    steps = config.speculative_num_steps
    num_draft_tokens = config.speculative_num_draft_tokens
    if topk > 1:
        return eagle_tree_params(config, topk)
    if topk < 1:
        raise ValueError(f"--speculative-eagle-topk must be at least 1 (got {topk})")
    if steps is None:
        steps = DEFAULT_EAGLE_STEPS if num_draft_tokens is None else num_draft_tokens - 1
    if steps < 1:
        raise ValueError(f"--speculative-num-steps must be at least 1 (got {steps})")
    if num_draft_tokens is not None and num_draft_tokens != steps + 1:
        raise ValueError(
            f"--speculative-num-draft-tokens {num_draft_tokens} with --speculative-num-steps "
            f"{steps}: a chain (topk 1) verifies num-steps + 1 tokens; leave one of them unset"
        )
    return EagleParams(algorithm, config.speculative_draft_model_path, steps)


def eagle_tree_params(config: SchedulerConfig, topk: int) -> EagleParams:
    """EAGLE / EAGLE3 with --speculative-eagle-topk above 1: tree drafts (EAGLE-2's beam over the
    head's rounds); --speculative-num-draft-tokens (the root included) defaults to
    num_steps * topk + 1."""
    algorithm = config.speculative_algorithm
    if algorithm == "STANDALONE":
        raise ValueError(
            "--speculative-eagle-topk above 1 is built for draft heads (EAGLE, EAGLE3); a "
            "STANDALONE draft model drafts a chain (topk 1)"
        )
    steps = config.speculative_num_steps or DEFAULT_EAGLE_STEPS
    if steps < 1:
        raise ValueError(f"--speculative-num-steps must be at least 1 (got {steps})")
    candidates = topk + (steps - 1) * topk * topk  # every node the rounds rank
    num_draft_tokens = config.speculative_num_draft_tokens or steps * topk + 1
    most = min(candidates, MAX_TREE_DRAFT_TOKENS)
    if not 2 <= num_draft_tokens <= most + 1:
        raise ValueError(
            f"--speculative-num-draft-tokens {num_draft_tokens} with --speculative-eagle-topk "
            f"{topk} and --speculative-num-steps {steps}: the tree holds 1..{most} "
            "drafts plus the root (the rounds rank topk + (steps - 1) * topk^2 candidates; a "
            f"tree holds at most {MAX_TREE_DRAFT_TOKENS})"
        )
    return EagleParams(
        algorithm, config.speculative_draft_model_path, steps, topk, num_draft_tokens
    )


def ngram_params(config: SchedulerConfig) -> NgramParams | None:
    """The n-gram drafter's settings, None unless the algorithm is NGRAM; ValueError for settings
    that do not fit (unset flags take NgramParams' defaults)."""
    if config.speculative_algorithm != "NGRAM":
        return None
    defaults = NgramParams()
    num_draft_tokens = config.speculative_num_draft_tokens

    def pick(value, default):
        return default if value is None else value

    params = NgramParams(
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
        max_bfs_breadth=pick(config.speculative_ngram_max_bfs_breadth, defaults.max_bfs_breadth),
    )
    return params


def drafts_trees(params: NgramParams | EagleParams | None) -> bool:
    """Whether the drafter makes tree drafts (the executor then keeps spare slot-table rows)."""
    if isinstance(params, EagleParams):
        return params.topk > 1
    return isinstance(params, NgramParams) and params.max_bfs_breadth > 1


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


def draft_for(req: Request, params: NgramParams | EagleParams, context_length: int) -> list[int]:
    """req's draft for its next step: the executor's last proposal for it (EAGLE), or an n-gram
    lookup (its proposer brought up to date with its tokens first)."""
    limit = min(
        params.max_draft_tokens, req.remaining_new_tokens - 1, context_length - req.seq_len - 1
    )
    if isinstance(params, EagleParams):
        return req.proposed_draft_ids[: max(limit, 0)]
    if req.proposer is None:
        req.proposer = NgramProposer(params)
    seq_len = req.seq_len
    if len(req.proposer) < seq_len:
        req.proposer.extend(req.seq[len(req.proposer) :])
    return req.proposer.propose(limit) if limit > 0 else []


def draft_tree_for(
    req: Request, params: NgramParams, context_length: int
) -> tuple[list[int], list[int]]:
    """req's tree draft for its next step (NGRAM with max_bfs_breadth > 1): (tokens, parents) as
    common/draft_tree.py describes them, up to draft_for's limit of tokens."""
    limit = min(
        params.max_draft_tokens, req.remaining_new_tokens - 1, context_length - req.seq_len - 1
    )
    if req.proposer is None:
        req.proposer = NgramProposer(params)
    seq_len = req.seq_len
    if len(req.proposer) < seq_len:
        req.proposer.extend(req.seq[len(req.proposer) :])
    return req.proposer.propose_tree(limit) if limit > 0 else ([], [])


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
