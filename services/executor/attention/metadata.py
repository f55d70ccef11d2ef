"""Per-step batch description that attention layers read from a context the runner sets.

Token order of a step: all extend (prefill) sequences first, then all decode tokens (one per
sequence). Models see only the flattened token batch; attention layers find everything else here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from services.executor.attention.backend import AttentionBackend
    from services.executor.kv_cache import KVPool


@dataclass
class ExtendSeq:
    start: int  # first token of the sequence in the flattened batch
    num_tokens: int  # tokens run this step
    prefix_len: int  # tokens whose KV is already in the cache
    slots: torch.Tensor  # all slots of the sequence, prefix + new, in position order (int64)

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.num_tokens


@dataclass
class ForwardBatch:
    num_tokens: int
    out_slots: torch.Tensor  # [num_tokens] int64: where each token's K/V is written
    extend_seqs: list[ExtendSeq]
    num_extend_tokens: int
    decode_slots: list[torch.Tensor]  # per decode sequence, its full slot list (including the new slot)
    kv_pool: "KVPool"
    attn_backend: "AttentionBackend"
    attn_metadata: Any = field(default=None)  # whatever the backend prepared for this step

    @property
    def num_decode(self) -> int:
        return len(self.decode_slots)


_current: ForwardBatch | None = None


@contextlib.contextmanager
def forward_context(batch: ForwardBatch):
    global _current
    previous, _current = _current, batch
    try:
        batch.attn_backend.init_forward_metadata(batch)
        yield batch
    finally:
        _current = previous


def get_forward_batch() -> ForwardBatch:
    if _current is None:
        raise RuntimeError("attention called outside a forward_context")
    return _current
