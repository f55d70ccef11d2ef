"""Turn a step's diff into the ForwardBatch the model runs: validate, update request state and the
SlotTable, lay out tokens.

Validation runs before any state changes, so an invalid step leaves the executor as it was
(except for finished_request_ids, which are dropped first by definition).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from radixserve.executor.host_copy import to_device
from radixserve.common.sampling import MAX_TOP_LOGPROBS
from radixserve.executor.attention.metadata import ExtendSeq, ForwardBatch, StepSamples, TableMeta
from radixserve.executor.prompt_logprobs import PromptLogprobRows
from radixserve.executor.request_state import RequestState
from radixserve.executor.slot_table import SlotTable
from radixserve.common.draft_tree import depths, is_chain, path_to, tree_error
from radixserve.common.step import PromptLogprobRange, StepError, StepInput

if TYPE_CHECKING:
    from radixserve.executor.attention.backend import AttentionBackend
    from radixserve.executor.kv_cache import KVPool


@dataclass
class _Seq:
    request_id: str
    state: RequestState
    tokens: list[int] | None  # None: the token sampled last step
    new_slots: list[int]
    sample: bool
    prompt_logprobs: PromptLogprobRange | None = None
    drafts: list[int] = field(default_factory=list)  # run after the token sampled last step
    parents: list[int] = field(default_factory=list)  # tree drafts (draft_tree.py); empty: a chain

    @property
    def decode(self) -> bool:
        """The token sampled last step alone: a decode row (prompt tokens and verify steps extend)."""
        return self.tokens is None and len(self.new_slots) == 1

    @property
    def tree(self) -> bool:
        """Drafts shaped as a tree, not a chain: decode rows, each node on a spare table row."""
        return bool(self.drafts) and not is_chain(self.parents)


class _Packer:
    """Collects the step's int lists and moves them to the device in one copy.

    Each list starts on a 16-byte boundary (an even int64 index): Triton specializes a kernel on whether
    each pointer argument is 16-byte aligned, so a list landing on an odd index after an odd-sized one
    would compile a new variant of every kernel it reaches, on live traffic, after the warm-up.
    """

    def __init__(self):
        self.values: list[int] = []
        self.sizes: list[int] = []  # each list's size, then its padding (0 or 1)

    def add(self, values: list[int]) -> None:
        pad = len(values) & 1
        self.sizes += (len(values), pad)
        self.values += values
        if pad:
            self.values.append(0)

    def ship(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        packed = to_device(self.values, device, torch.int64)
        # One op (cheaper than a slice per list on the CPU); the padding parts are dropped.
        return packed.split_with_sizes(self.sizes)[::2]


class BatchBuilder:
    def __init__(
        self,
        kv_slots: int,
        vocab_size: int,
        context_length: int,
        slot_table: SlotTable,
        kv_pool: "KVPool",
        attn_backend: "AttentionBackend",
    ):
        self.kv_slots, self.vocab_size, self.context_length = kv_slots, vocab_size, context_length
        self.slot_table, self.kv_pool, self.attn_backend = slot_table, kv_pool, attn_backend
        self.device = slot_table.tensor.device

    def _check_ids_and_slots(self, rid: str, input_ids, slots, what: str) -> None:
        if slots and (min(slots) < 1 or max(slots) >= self.kv_slots):
            raise StepError(f"request {rid}: {what} slot ids must be in 1..{self.kv_slots - 1}")
        if input_ids and (min(input_ids) < 0 or max(input_ids) >= self.vocab_size):
            raise StepError(f"request {rid}: token ids must be in 0..{self.vocab_size - 1}")

    def _check_length(self, rid: str, length: int) -> None:
        if length > self.context_length:
            raise StepError(
                f"request {rid}: {length} tokens exceed the context length {self.context_length}"
            )

    @staticmethod
    def _check_bitmask(rid: str, bitmask: bytes) -> None:
        if len(bitmask) % 4:
            raise StepError(
                f"request {rid}: token_bitmask has {len(bitmask)} bytes, not whole int32 words"
            )

    def _check_prompt_logprobs(self, rid: str, r: PromptLogprobRange | None, n: int) -> None:
        if r is None:
            return
        if not (r.start >= 0 and r.count >= 1 and r.start + r.count <= n):
            raise StepError(
                f"request {rid}: prompt logprob range [{r.start}, {r.start + r.count}) is not "
                f"inside its {n} input ids"
            )
        if r.start + r.count == n and not 0 <= r.next_token_id < self.vocab_size:
            raise StepError(
                f"request {rid}: prompt logprob range ends at the last input id but next_token_id "
                f"{r.next_token_id} is not a token id"
            )
        if not 0 <= r.top_logprobs_num <= MAX_TOP_LOGPROBS:
            raise StepError(f"request {rid}: top_logprobs_num must be in 0..{MAX_TOP_LOGPROBS}")

    def validate(self, step: StepInput, states: dict[str, RequestState]) -> None:
        if len(step.new_requests) > self.slot_table.free_rows:
            raise StepError(
                f"{len(step.new_requests)} new requests but only {self.slot_table.free_rows} free rows "
                "in the executor's slot table; raise --max-running-requests on the executor "
                "or lower it on the scheduler"
            )
        seen: set[str] = set()
        tree_nodes = 0
        for req in step.new_requests:
            rid = req.request_id
            if rid in states or rid in seen:
                raise StepError(f"new request {rid} is already active (finish it first)")
            seen.add(rid)
            if not req.input_ids:
                raise StepError(f"new request {rid} has no input_ids")
            if len(req.new_slots) != len(req.input_ids):
                raise StepError(
                    f"new request {rid}: {len(req.new_slots)} new_slots for {len(req.input_ids)} input_ids"
                )
            self._check_ids_and_slots(rid, req.input_ids, req.new_slots, "new")
            self._check_ids_and_slots(rid, None, req.prefix_slots, "prefix")
            self._check_length(rid, len(req.prefix_slots) + len(req.input_ids))
            self._check_bitmask(rid, req.token_bitmask)
            self._check_prompt_logprobs(rid, req.prompt_logprobs, len(req.input_ids))
            if any(not 0 <= t < self.vocab_size for t in req.sampling.token_ids_logprob):
                raise StepError(
                    f"request {rid}: token_ids_logprob must be in 0..{self.vocab_size - 1}"
                )
        for req in step.continuing_requests:
            rid = req.request_id
            state = states.get(rid)
            if state is None:
                raise StepError(f"continuing request {rid} is unknown (never added, or finished)")
            if rid in seen:
                raise StepError(f"request {rid} appears twice in the step")
            seen.add(rid)
            if state.verifying:
                raise StepError(
                    f"request {rid}: the result of its previous verify step is not read yet"
                )
            if req.draft_ids:
                self._check_drafts(rid, req, state)
            elif req.draft_parents:
                raise StepError(f"request {rid}: draft_parents without draft_ids")
            if not is_chain(req.draft_parents):
                tree_nodes += len(req.draft_ids)
            n = len(req.input_ids) or 1 + len(req.draft_ids)
            if not req.input_ids and not state.has_token:
                raise StepError(
                    f"continuing request {rid} has no input_ids and no token sampled for it"
                )
            if len(req.new_slots) != n:
                raise StepError(
                    f"continuing request {rid}: {len(req.new_slots)} new_slots for {n} tokens"
                )
            self._check_ids_and_slots(rid, req.input_ids, req.new_slots, "new")
            self._check_length(rid, state.length + n)
            self._check_bitmask(rid, req.token_bitmask)
            self._check_prompt_logprobs(rid, req.prompt_logprobs, len(req.input_ids))
        if tree_nodes > self.slot_table.spare_rows:
            raise StepError(
                f"{tree_nodes} tree draft tokens in one step, over the executor's "
                f"{self.slot_table.spare_rows} (tree drafts need --speculative-ngram-max-bfs-breadth "
                "or --speculative-eagle-topk above 1 on the executor too)"
            )

    def _check_drafts(self, rid: str, req, state: RequestState) -> None:
        if req.input_ids or not req.sample or req.token_bitmask or req.prompt_logprobs:
            raise StepError(
                f"request {rid}: draft_ids only come with a plain decode (no input_ids, no "
                "token_bitmask, no prompt logprobs, sampling)"
            )
        ls = state.logits_state
        if ls is not None and (
            ls.penalty_row >= 0 or ls.bias_ids or ls.num_generated < ls.min_new_tokens
        ):
            raise StepError(
                f"request {rid}: draft_ids with penalties, logit_bias or min_new_tokens pending "
                "(those requests decode without speculation)"
            )
        self._check_ids_and_slots(rid, req.draft_ids, None, "draft")
        why = tree_error(list(req.draft_ids), list(req.draft_parents))
        if why is not None:
            raise StepError(f"request {rid}: {why}")

    def build(self, step: StepInput, states: dict[str, RequestState]) -> ForwardBatch:
        """Validate, register new requests, write their slots to the SlotTable and lay the tokens out
        (extends first)."""
        self.validate(step, states)
        table = self.slot_table
        seqs: list[_Seq] = []
        table_writes: tuple[list[int], list[int], list[int]] = ([], [], [])
        for req in step.new_requests:
            state = RequestState.create(
                table.assign(), len(req.prefix_slots), req.sampling, self.device
            )
            state.lora_name = req.lora_name
            states[req.request_id] = state
            self._table_write(table_writes, state.table_row, 0, req.prefix_slots)
            seqs.append(
                _Seq(
                    req.request_id,
                    state,
                    list(req.input_ids),
                    list(req.new_slots),
                    req.sample,
                    req.prompt_logprobs,
                )
            )
        for req in step.continuing_requests:
            tokens = list(req.input_ids) if req.input_ids else None
            seqs.append(
                _Seq(
                    req.request_id,
                    states[req.request_id],
                    tokens,
                    list(req.new_slots),
                    req.sample,
                    req.prompt_logprobs,
                    list(req.draft_ids),
                    list(req.draft_parents),
                )
            )

        # Prompt tokens, however many (one: a prompt's last token after a full cache hit), run as an
        # extend, as their prefill does; a token sampled last step is a decode row, and so are a
        # verify step's tokens where the backend takes them as rows (verify_as_decode_rows).
        # Tree drafts are decode rows on every backend: each node sees its own ancestors only.
        rows_for_drafts = self.attn_backend.verify_as_decode_rows
        extends = [s for s in seqs if not (s.decode or s.tree or (s.drafts and rows_for_drafts))]
        in_extends = {id(s) for s in extends}
        decodes = [s for s in seqs if id(s) not in in_extends]
        if any(s.state.lora_name for s in decodes):
            # Tokens of one adapter side by side: the LoRA kernels read an adapter's weights once
            # per run of its tokens in a tile (kernels/lora.py).
            decodes.sort(key=lambda s: s.state.lora_name)
        ordered = extends + decodes
        # Per attention sequence (an extend, or one decode row), its table row and length after the step.
        seq_rows: list[int] = []
        seq_lens: list[int] = []
        input_ids: list[int] = []
        positions: list[int] = []
        out_slots: list[int] = []
        extend_seqs: list[ExtendSeq] = []
        decode_lens: list[int] = []
        last_index: dict[int, int] = {}
        prompt_logprobs: list[PromptLogprobRows] = []
        # Decode inputs sampled last step: read from the table's next_tokens on the device.
        gather_at: list[int] = []
        gather_rows: list[int] = []
        seq_spans: list[tuple[str, int, int, int]] = []
        # Tree drafts: (the request's row, its columns each node's spare row copies, the spare rows).
        tree_copies: list[tuple[int, int, list[int]]] = []
        spare_used = 0
        for seq in ordered:
            state = seq.state
            start, prefix = len(input_ids), state.length
            n = len(seq.new_slots)
            seq_spans.append((seq.request_id, start, prefix, n))
            if seq.tokens is not None:
                input_ids += seq.tokens
            else:
                gather_at.append(start)
                gather_rows.append(state.table_row)
                input_ids.append(0)
                input_ids += seq.drafts
            state.has_token = seq.sample  # the runner samples it this step
            out_slots += seq.new_slots
            self._table_write(table_writes, state.table_row, prefix, seq.new_slots)
            state.length += n
            if seq.tree:
                # The root at prefix, each node one position after its parent, on its own row.
                spare = [table.spare(spare_used + i) for i in range(n - 1)]
                spare_used += n - 1
                tree_copies.append((state.table_row, prefix + 1, spare))
                positions += [prefix, *(prefix + d for d in depths(seq.parents))]
                seq_rows += [state.table_row, *spare]
                decode_lens.append(prefix + 1)
                for node, row in enumerate(spare):
                    path = [seq.new_slots[1 + j] for j in path_to(seq.parents, node)]
                    self._table_write(table_writes, row, prefix + 1, path)
                    decode_lens.append(prefix + 1 + len(path))
            elif id(seq) in in_extends:
                positions += range(prefix, prefix + n)
                extend_seqs.append(ExtendSeq(start, n, prefix, state.table_row))
                seq_rows.append(state.table_row)
                seq_lens.append(state.length)
            else:
                positions += range(prefix, prefix + n)
                decode_lens += range(prefix + 1, prefix + n + 1)
                seq_rows += [state.table_row] * n
            last_index[id(seq)] = start + n - 1
            if seq.prompt_logprobs is not None:
                prompt_logprobs.append(_prompt_logprob_rows(seq, start))

        sampling = [s for s in seqs if s.sample]
        # A request with drafts samples at each of its tokens: after the last verified one, then
        # after each draft token.
        sample_index = [
            i
            for s in sampling
            for i in range(last_index[id(s)] - len(s.drafts), last_index[id(s)] + 1)
        ]
        packer = _Packer()
        for values in (
            input_ids,
            positions,
            out_slots,
            sample_index,
            [s.state.table_row for s in sampling],
            seq_rows,
            seq_lens + decode_lens,
            [e.prefix_len for e in extend_seqs],
            [e.start for e in extend_seqs],
            [e.num_tokens for e in extend_seqs],
            *table_writes,
            gather_at,
            gather_rows,
        ):
            packer.add(values)
        (
            ids_t,
            pos_t,
            out_t,
            sample_t,
            sample_rows,
            rows_t,
            lens_t,
            prefix_t,
            starts_t,
            qlens_t,
            w_rows,
            w_cols,
            w_vals,
            g_at,
            g_rows,
        ) = packer.ship(self.device)
        table.write(w_rows, w_cols, w_vals)
        self._copy_tree_prefixes(tree_copies)
        if len(gather_at) == len(input_ids):
            ids_t = table.next_tokens.index_select(0, g_rows)
        elif gather_at:
            ids_t.index_copy_(0, g_at, table.next_tokens.index_select(0, g_rows))
        table_meta = TableMeta(
            table.tensor,
            rows_t,
            lens_t,
            prefix_t,
            starts_t,
            qlens_t,
            max((e.num_tokens for e in extend_seqs), default=0),
        )
        samples = None
        if sampling:
            samples = StepSamples(
                sample_t,
                sample_index == list(range(len(input_ids))),
                [s.request_id for s in sampling],
                [s.state for s in sampling],
                sample_rows,
                [len(s.drafts) for s in sampling] if any(s.drafts for s in sampling) else [],
                [s.drafts for s in sampling],
                [s.parents for s in sampling] if any(s.tree for s in sampling) else [],
                [s.new_slots[1:] for s in sampling] if any(s.tree for s in sampling) else [],
            )
        return ForwardBatch(
            input_ids=ids_t,
            positions=pos_t,
            out_slots=out_t,
            extend_seqs=extend_seqs,
            num_extend_tokens=sum(e.num_tokens for e in extend_seqs),
            decode_lens=decode_lens,
            kv_pool=self.kv_pool,
            attn_backend=self.attn_backend,
            table_meta=table_meta,
            samples=samples,
            prompt_logprobs=prompt_logprobs,
            seq_spans=seq_spans,
            seq_states=[s.state for s in ordered],
        )

    def _copy_tree_prefixes(self, copies: list[tuple[int, int, list[int]]]) -> None:
        """Each tree node's spare row starts with its request's first slots (the prefix and the
        root), after this step's table writes: the path columns past them were written there."""
        tensor = self.slot_table.tensor
        for row, cols, spare in copies:
            spare_t = to_device(spare, self.device, torch.int64)
            tensor[spare_t, :cols] = tensor[row, :cols]

    @staticmethod
    def _table_write(
        writes: tuple[list[int], list[int], list[int]], row: int, first_col: int, slots: list[int]
    ) -> None:
        rows, cols, values = writes
        rows += [row] * len(slots)
        cols += range(first_col, first_col + len(slots))
        values += slots


def _prompt_logprob_rows(seq: _Seq, batch_start: int) -> PromptLogprobRows:
    r = seq.prompt_logprobs
    return PromptLogprobRows(
        seq.request_id, batch_start + r.start, r.targets(seq.tokens), r.top_logprobs_num
    )
