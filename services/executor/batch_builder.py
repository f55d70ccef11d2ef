"""Turn a step's diff into one flattened token batch: validate, update request state, lay out tokens.

Validation runs before any state changes, so an invalid step leaves the executor as it was
(except for finished_request_ids, which are dropped first by definition).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.executor.attention.metadata import ExtendSeq, TableMeta
from radixserve.executor.request_state import RequestState
from radixserve.executor.slot_table import SlotTable
from radixserve.common.step import StepError, StepInput


@dataclass
class _Seq:
    request_id: str
    state: RequestState
    tokens: list[int] | None  # None: the token sampled last step
    new_slots: list[int]
    sample: bool


@dataclass
class BuiltBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_slots: torch.Tensor
    extend_seqs: list[ExtendSeq]
    num_extend_tokens: int
    decode_slots: list[torch.Tensor]
    sample_token_index: torch.Tensor  # flattened-batch index of each sampling request's last token
    samples_every_token: bool  # sample_token_index is 0..num_tokens-1 (one token per request, each sampling)
    sample_request_ids: list[str]
    sample_states: list[RequestState]
    table_meta: TableMeta | None = None
    sample_rows: torch.Tensor | None = None  # the sampling requests' SlotTable rows (device), with a table


class _Packer:
    """Collects the step's int lists and moves them to the device in one copy."""

    def __init__(self):
        self.values: list[int] = []
        self.spans: list[tuple[int, int]] = []

    def add(self, values: list[int]) -> int:
        self.spans.append((len(self.values), len(values)))
        self.values += values
        return len(self.spans) - 1

    def ship(self, device: torch.device) -> list[torch.Tensor]:
        packed = torch.tensor(self.values, dtype=torch.int64)
        if device.type != "cpu":
            packed = packed.pin_memory().to(device, non_blocking=True)
        return [packed[start:start + n] for start, n in self.spans]


class BatchBuilder:
    def __init__(self, kv_slots: int, vocab_size: int, context_length: int, device: torch.device,
                 slot_table: SlotTable | None = None):
        self.kv_slots, self.vocab_size, self.context_length = kv_slots, vocab_size, context_length
        self.device = device
        self.slot_table = slot_table

    def _check_ids_and_slots(self, rid: str, input_ids, slots, what: str) -> None:
        if slots and (min(slots) < 1 or max(slots) >= self.kv_slots):
            raise StepError(f"request {rid}: {what} slot ids must be in 1..{self.kv_slots - 1}")
        if input_ids and (min(input_ids) < 0 or max(input_ids) >= self.vocab_size):
            raise StepError(f"request {rid}: token ids must be in 0..{self.vocab_size - 1}")

    def _check_length(self, rid: str, length: int) -> None:
        if length > self.context_length:
            raise StepError(f"request {rid}: {length} tokens exceed the context length {self.context_length}")

    @staticmethod
    def _check_bitmask(rid: str, bitmask: bytes) -> None:
        if len(bitmask) % 4:
            raise StepError(f"request {rid}: token_bitmask has {len(bitmask)} bytes, not whole int32 words")

    def validate(self, step: StepInput, states: dict[str, RequestState]) -> None:
        if self.slot_table is not None and len(step.new_requests) > self.slot_table.free_rows:
            raise StepError(f"{len(step.new_requests)} new requests but only {self.slot_table.free_rows} free rows "
                            "in the executor's slot table; raise --max-running-requests on the executor "
                            "or lower it on the scheduler")
        seen: set[str] = set()
        for req in step.new_requests:
            rid = req.request_id
            if rid in states or rid in seen:
                raise StepError(f"new request {rid} is already active (finish it first)")
            seen.add(rid)
            if not req.input_ids:
                raise StepError(f"new request {rid} has no input_ids")
            if len(req.new_slots) != len(req.input_ids):
                raise StepError(f"new request {rid}: {len(req.new_slots)} new_slots for {len(req.input_ids)} input_ids")
            self._check_ids_and_slots(rid, req.input_ids, req.new_slots, "new")
            self._check_ids_and_slots(rid, None, req.prefix_slots, "prefix")
            self._check_length(rid, len(req.prefix_slots) + len(req.input_ids))
            self._check_bitmask(rid, req.token_bitmask)
        for req in step.continuing_requests:
            rid = req.request_id
            state = states.get(rid)
            if state is None:
                raise StepError(f"continuing request {rid} is unknown (never added, or finished)")
            if rid in seen:
                raise StepError(f"request {rid} appears twice in the step")
            seen.add(rid)
            n = len(req.input_ids) or 1
            if not req.input_ids and not state.has_token:
                raise StepError(f"continuing request {rid} has no input_ids and no token sampled for it")
            if len(req.new_slots) != n:
                raise StepError(f"continuing request {rid}: {len(req.new_slots)} new_slots for {n} tokens")
            self._check_ids_and_slots(rid, req.input_ids, req.new_slots, "new")
            self._check_length(rid, state.length + n)
            self._check_bitmask(rid, req.token_bitmask)

    def build(self, step: StepInput, states: dict[str, RequestState]) -> BuiltBatch:
        """Validate, register new requests, append slots and lay the tokens out (extends first)."""
        self.validate(step, states)
        seqs: list[_Seq] = []
        table_writes: tuple[list[int], list[int], list[int]] = ([], [], [])
        for req in step.new_requests:
            state = RequestState.create(list(req.prefix_slots), req.sampling, self.device,
                                        host_slots=self.slot_table is None)
            states[req.request_id] = state
            if self.slot_table is not None:
                state.table_row = self.slot_table.assign()
                self._table_write(table_writes, state.table_row, 0, list(req.prefix_slots))
            seqs.append(_Seq(req.request_id, state, list(req.input_ids), list(req.new_slots), req.sample))
        for req in step.continuing_requests:
            tokens = list(req.input_ids) if req.input_ids else None
            seqs.append(_Seq(req.request_id, states[req.request_id], tokens, list(req.new_slots), req.sample))

        extends = [s for s in seqs if len(s.new_slots) > 1]
        decodes = [s for s in seqs if len(s.new_slots) == 1]
        input_ids: list[int] = []
        positions: list[int] = []
        out_slots: list[int] = []
        extend_seqs: list[ExtendSeq] = []
        decode_slots: list[torch.Tensor] = []
        last_index: dict[int, int] = {}
        # Decode inputs sampled last step, with a SlotTable: read from its next_tokens on the device.
        gather_at: list[int] = []
        gather_rows: list[int] = []
        for seq in extends + decodes:
            state = seq.state
            start, prefix = len(input_ids), state.length
            n = len(seq.new_slots)
            if seq.tokens is not None:
                input_ids += seq.tokens
            elif self.slot_table is not None:
                gather_at.append(start)
                gather_rows.append(state.table_row)
                input_ids.append(0)
            else:
                input_ids.append(state.last_token)
            state.has_token = seq.sample  # the runner samples it this step
            positions += range(prefix, prefix + n)
            out_slots += seq.new_slots
            if self.slot_table is not None:
                # The device table is the slot list GPU backends read; no host copy is kept.
                self._table_write(table_writes, state.table_row, prefix, seq.new_slots)
                state.length += n
                all_slots = None
            else:
                all_slots = state.append_slots(seq.new_slots)
            if n > 1:
                extend_seqs.append(ExtendSeq(start, n, prefix, all_slots))
            else:
                decode_slots.append(all_slots)
            last_index[id(seq)] = start + n - 1

        sampling = [s for s in seqs if s.sample]
        sample_index = [last_index[id(s)] for s in sampling]
        packer = _Packer()
        fields = [packer.add(v) for v in (input_ids, positions, out_slots, sample_index)]
        if self.slot_table is not None:
            ordered = extends + decodes
            fields += [packer.add(v) for v in (
                [s.state.table_row for s in ordered], [s.state.length for s in ordered],
                [e.prefix_len for e in extend_seqs], [e.start for e in extend_seqs],
                [e.num_tokens for e in extend_seqs], *table_writes, gather_at, gather_rows,
                [s.state.table_row for s in sampling])]
        shipped = packer.ship(self.device)
        ids_t, pos_t, out_t, sample_t = shipped[:4]
        table_meta = None
        if self.slot_table is not None:
            rows_t, lens_t, prefix_t, starts_t, qlens_t, w_rows, w_cols, w_vals, g_at, g_rows, sample_rows = shipped[4:]
            self.slot_table.write(w_rows, w_cols, w_vals)
            if len(gather_at) == len(input_ids):
                ids_t = self.slot_table.next_tokens.index_select(0, g_rows)
            elif gather_at:
                ids_t.index_copy_(0, g_at, self.slot_table.next_tokens.index_select(0, g_rows))
            table_meta = TableMeta(self.slot_table.tensor, rows_t, lens_t, prefix_t, starts_t, qlens_t,
                                   max((e.num_tokens for e in extend_seqs), default=0))
        return BuiltBatch(
            input_ids=ids_t,
            positions=pos_t,
            out_slots=out_t,
            extend_seqs=extend_seqs,
            num_extend_tokens=sum(len(s.new_slots) for s in extends),
            decode_slots=decode_slots,
            sample_token_index=sample_t,
            samples_every_token=sample_index == list(range(len(input_ids))),
            sample_request_ids=[s.request_id for s in sampling],
            sample_states=[s.state for s in sampling],
            table_meta=table_meta,
            sample_rows=sample_rows if self.slot_table is not None else None,
        )

    @staticmethod
    def _table_write(writes: tuple[list[int], list[int], list[int]], row: int, first_col: int,
                     slots: list[int]) -> None:
        rows, cols, values = writes
        rows += [row] * len(slots)
        cols += range(first_col, first_col + len(slots))
        values += slots
