"""SGLang's --stream-interval N: a request's new tokens leave the core every N generated tokens, not
every step. Each message costs the services CPU on its way (the Session stream, a DecodeStream
exchange, an SSE frame), so N > 1 sends fewer, larger ones. Pure: no I/O.

What is released at once, whatever N: the first event of a request (its first token: time to first
token is unchanged; prompt logprobs ride on it) and every finished event (a stop, the length limit, an
abort), which carries the tokens held back before it. Between them tokens are held until at least N
have gathered (a speculative step may add several at once). Logprobs and usage travel with the tokens:
a released event has every held token's logprob, in order, and the usage of its newest step.
"""

from __future__ import annotations

from collections.abc import Iterable

from radixserve.scheduler.request import RequestEvent


class StreamBuffer:
    def __init__(self, interval: int = 1):
        if interval < 1:
            raise ValueError(f"stream interval must be at least 1 (got {interval})")
        self.interval = interval
        self.held: dict[str, RequestEvent] = {}  # per request: its tokens not yet released

    def release(self, events: list[RequestEvent]) -> list[RequestEvent]:
        """The events to send now for a step's events; the others are held (merged per request)."""
        if self.interval == 1:
            return events
        out = []
        for event in events:
            earlier = self.held.pop(event.request_id, None)
            if earlier is not None:
                event = merged(earlier, event)
            if event.finished or is_first(event) or len(event.token_ids) >= self.interval:
                out.append(event)
            else:
                self.held[event.request_id] = event
        return out

    def flush(self, event: RequestEvent) -> RequestEvent:
        """event (a finish outside a step: an abort) with the request's held tokens before it."""
        earlier = self.held.pop(event.request_id, None)
        return event if earlier is None else merged(earlier, event)

    def keep_only(self, request_ids: Iterable[str]) -> None:
        """Forget the held tokens of every request but these (the others failed: nothing more is sent)."""
        keep = set(request_ids)
        self.held = {rid: e for rid, e in self.held.items() if rid in keep}


def is_first(event: RequestEvent) -> bool:
    """Whether event holds the request's first generated tokens (none were generated before them)."""
    return bool(event.token_ids) and event.completion_tokens == len(event.token_ids)


def merged(earlier: RequestEvent, later: RequestEvent) -> RequestEvent:
    """One event for two successive ones of a request: tokens, logprobs and prompt logprobs in order;
    the finish and the usage of the later."""
    return RequestEvent(
        request_id=later.request_id,
        token_ids=earlier.token_ids + later.token_ids,
        logprobs=earlier.logprobs + later.logprobs,
        prompt_logprobs=earlier.prompt_logprobs + later.prompt_logprobs,
        finish_reason=later.finish_reason,
        matched_stop_token_id=later.matched_stop_token_id,
        prompt_tokens=later.prompt_tokens,
        completion_tokens=later.completion_tokens,
        cached_tokens=later.cached_tokens,
    )
