"""When a request stops: its stop conditions (StoppingCriteria) and its grammar, applied to each sampled
token, and the event the scheduler reports for it. Plain functions of the request; no I/O."""

from __future__ import annotations

from radixserve.scheduler.request import FinishReason, Request, RequestEvent


def finish_reason(
    req: Request, token: int, eos_token_ids: frozenset[int], context_length: int
) -> tuple[FinishReason | None, int]:
    """Whether token (already appended to req.output_ids) ends req: (reason, the matched stop token)."""
    stopping = req.stopping
    # As the executor's mask: min_new_tokens tokens come before a stop token (which is in output_ids).
    stop_allowed = len(req.output_ids) > stopping.min_new_tokens
    if stop_allowed and token in eos_token_ids and not stopping.ignore_eos:
        return FinishReason.STOP, token
    if stop_allowed and token in stopping.stop_token_ids:
        return FinishReason.STOP, token
    if len(req.output_ids) >= stopping.max_new_tokens or req.seq_len >= context_length:
        return FinishReason.LENGTH, 0
    return None, 0


def grammar_verdict(
    req: Request, token: int, reason: FinishReason | None, matched: int
) -> tuple[FinishReason | None, int]:
    """Feed a sampled token to req's grammar, unless a stop token already ended the request:
    the grammar's stop token (EOS, even with ignore_eos) ends it, a token the grammar forbids
    (the executor ignored the mask) aborts it."""
    if reason is FinishReason.STOP:
        return reason, matched
    if not req.grammar.accept(token):
        return FinishReason.ABORT, 0
    if req.grammar.terminated:
        return FinishReason.STOP, token
    return reason, matched


def request_event(req: Request, reason: FinishReason | None, matched: int = 0) -> RequestEvent:
    """req's event with its usage so far (the caller adds the step's tokens)."""
    return RequestEvent(
        request_id=req.request_id,
        finish_reason=reason,
        matched_stop_token_id=matched,
        prompt_tokens=len(req.prompt_ids),
        completion_tokens=len(req.output_ids),
        cached_tokens=req.cached_tokens,
    )
