"""The step as the model runs it (ForwardBatch), which attention layers read from a context the runner sets.

Token order of a step: all extend (prefill) sequences first, then all decode tokens (one per
sequence). Models see only the flattened token batch; attention layers find everything else here.
Every sequence's KV slot ids are in the executor's SlotTable (TableMeta.table), on every device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from radixserve.executor.attention.backend import AttentionBackend
    from radixserve.executor.kv_cache import KVPool
    from radixserve.executor.request_state import RequestState


@dataclass
class ExtendSeq:
    start: int  # first token of the sequence in the flattened batch
    num_tokens: int  # tokens run this step
    prefix_len: int  # tokens whose KV is already in the cache
    row: int = -1  # its SlotTable row (slots [0, seq_len) of it); -1 in a forward without KV cache

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.num_tokens


@dataclass
class TableMeta:
    """Where the step's sequences find their KV slots: rows of the executor's SlotTable.

    Sequence order is the token order: extend sequences first, then decode sequences, one per decode
    token (a verify step's tokens are several decode sequences of one table row when the backend sets
    verify_as_decode_rows). All device int64 tensors; max_extend_len is a host int (it sizes a kernel grid).
    """

    table: torch.Tensor  # [rows, width] slot ids (SlotTable.tensor)
    seq_rows: torch.Tensor  # [num_seqs] table row of each sequence
    seq_lens: torch.Tensor  # [num_seqs] tokens with KV after this step (prefix + new)
    extend_prefix_lens: torch.Tensor  # [num_extends]
    extend_q_starts: torch.Tensor  # [num_extends] first token of each extend sequence in the batch
    extend_q_lens: torch.Tensor  # [num_extends]
    max_extend_len: int

    @property
    def num_extends(self) -> int:
        return self.extend_q_lens.shape[0]

    @property
    def decode_rows(self) -> torch.Tensor:
        return self.seq_rows[self.num_extends :]

    @property
    def decode_lens(self) -> torch.Tensor:
        return self.seq_lens[self.num_extends :]


@dataclass
class StepSamples:
    """The requests of a step that sample, in output order."""

    token_index: torch.Tensor  # flattened-batch index of each one's last token
    every_token: bool  # token_index is 0..num_tokens-1 (one token per request, each sampling)
    request_ids: list[str]
    states: list["RequestState"]
    rows: torch.Tensor  # their SlotTable rows (device), where their sampled tokens are kept
    # Speculative decoding: draft tokens per request (empty: none in this step). A request with n
    # drafts has n + 1 entries in token_index, its last token's among them (spec_verify.py).
    num_drafts: list[int] = field(default_factory=list)
    draft_ids: list[list[int]] = field(default_factory=list)
    # Steps with tree drafts (else empty): each request's draft parents (draft_tree.py; empty: a
    # chain) and its drafts' KV slots, for the accepted path's slots to move to the request's row.
    draft_parents: list[list[int]] = field(default_factory=list)
    draft_slots: list[list[int]] = field(default_factory=list)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens] int64 (device)
    positions: torch.Tensor  # [num_tokens] int64 (device)
    out_slots: torch.Tensor  # [num_tokens] int64: where each token's K/V is written
    extend_seqs: list[ExtendSeq]
    num_extend_tokens: int
    decode_lens: list[
        int
    ]  # per decode sequence, its tokens with KV after this step (host ints; the device
    # copy is table_meta.decode_lens)
    kv_pool: "KVPool"
    attn_backend: "AttentionBackend"
    table_meta: TableMeta | None = None  # None only in a forward without KV cache (embeddings)
    samples: StepSamples | None = None  # None: no request samples this step
    # Requests that asked for prompt logprobs over this step's tokens (prompt_logprobs.PromptLogprobRows).
    prompt_logprobs: list[Any] = field(default_factory=list)
    attn_metadata: Any = field(default=None)  # whatever the backend prepared for this step
    # Per sequence, in batch order: (request id, index of its first token in the batch, that token's
    # position, its token count); for the inputs of vision-language models (image rows, M-RoPE).
    seq_spans: list[tuple[str, int, int, int]] = field(default_factory=list)
    # Each sequence's RequestState in token order (extends, then decodes): what per-sequence state
    # outside attention reads (the LoRA adapter of each token).
    seq_states: list["RequestState"] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_decode(self) -> int:
        return self.num_tokens - self.num_extend_tokens


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
