"""Stored responses of /v1/responses (`store: true`), in memory and bounded: at most MAX_ENTRIES
responses and MAX_BYTES of them (their JSON size); the oldest are evicted first. Pure: no I/O."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import orjson

MAX_ENTRIES = 1024
MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredResponse:
    response: dict  # the response object as answered
    input_items: list[dict]  # this request's own input, as items with ids
    context: list[dict]  # every item the next turn continues from: earlier turns, input, output
    size: int  # bytes counted against MAX_BYTES


def stored_size(response: dict, input_items: list[dict], context: list[dict]) -> int:
    return len(orjson.dumps([response, input_items, context]))


class ResponseStore:
    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, input_items: list[dict], context: list[dict]) -> bool:
        """Store (or replace) a response, evicting the oldest to make room; False when it alone is
        larger than max_bytes (then it is not stored)."""
        size = stored_size(response, input_items, context)
        self.delete(response["id"])
        if size > self.max_bytes:
            return False
        while self._entries and (
            len(self._entries) >= self.max_entries or self.total_bytes + size > self.max_bytes
        ):
            _, evicted = self._entries.popitem(last=False)
            self.total_bytes -= evicted.size
        self._entries[response["id"]] = StoredResponse(response, input_items, context, size)
        self.total_bytes += size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self.total_bytes -= entry.size
        return True
