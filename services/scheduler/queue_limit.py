"""--max-queued-requests, the same rule for generate and embed requests (pure: callers raise their own error)."""

from __future__ import annotations

import grpc


def queue_refusal(
    count: int, waiting: int, limit: int | None, unit: str, waiting_unit: str
) -> tuple[grpc.StatusCode, str] | None:
    """Why `count` more `unit`s (sequences, inputs) cannot join a queue holding `waiting` `waiting_unit`s, or
    None when they fit. More than the whole limit can never fit: INVALID_ARGUMENT (retrying is useless); more
    than what is left now: RESOURCE_EXHAUSTED (retry later)."""
    if limit is None:
        return None
    if count > limit:
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"this request has {count} {unit} but at most {limit} may wait in the queue "
            f"(--max-queued-requests): it can never be queued; send fewer",
        )
    if waiting + count > limit:
        needs = "" if count == 1 else f" and this request needs room for {count}"
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{waiting} {waiting_unit} are already waiting{needs} (--max-queued-requests {limit}); retry later",
        )
    return None
