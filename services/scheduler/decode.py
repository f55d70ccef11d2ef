"""Decoding and retraction: the running requests, which of them a step decodes, and which go back
to the queue when memory cannot hold one more token for each.

Mixed steps (enable_mixed_chunk): a prefill step also decodes one token for every running request,
so prefills do not stall decoding; those tokens count against the step's budget. When they would
take the whole budget, or memory cannot hold them, the step prefills only, as without mixing.

Retraction sends the newest admission back to the waiting queue (first in line); the KV it computed
stays in the prefix cache, so its re-prefill is mostly a cache hit. Only a serial schedule() (no
step in flight) retracts.

Speculative decoding (spec set): a request that may speculate drafts up to spec.max_draft_tokens
tokens (by n-gram lookup, or EAGLE: the executor's proposal that came with its last token) and gets a
slot for each from free memory (no draft when memory is short: drafts never evict or retract). Its
draft follows its known tokens, so it is decoded only when no step in flight samples for it (it
alternates with the rest of the batch instead of overlapping). Mixed prefill steps decode without
drafts.
"""

from __future__ import annotations

from radixserve.scheduler.kv_accounting import KVAccounting
from radixserve.scheduler.ngram_proposer import NgramParams
from radixserve.scheduler.prefill import NewTokenRatio, PrefillManager, allowed_tokens
from radixserve.common.step import ContinuingRequest, StepInput
from radixserve.scheduler.request import Request
from radixserve.common.draft_tree import first_chain, is_chain
from radixserve.scheduler.speculation import (
    EagleParams,
    draft_for,
    draft_tree_for,
    drafts_trees,
    may_speculate,
)


class DecodeManager:
    def __init__(
        self,
        kv: KVAccounting,
        ratio: NewTokenRatio,
        context_length: int,
        spec: NgramParams | EagleParams | None = None,
        max_verify_rows: int = 0,
        disable_by_batch_size: int | None = None,
        max_tree_rows: int = 0,
    ):
        """max_verify_rows: a decode step's tokens, drafts included, stay within it (0: no limit);
        max_tree_rows: a step's tree drafts' tokens stay within it (the executor's spare rows);
        disable_by_batch_size: no drafts in a step of more requests (None: no limit)."""
        self.kv = kv
        self.ratio = ratio
        self.context_length = context_length
        self.spec = spec
        self.max_verify_rows = max_verify_rows
        self.max_tree_rows = max_tree_rows
        self.disable_by_batch_size = disable_by_batch_size
        self.running: list[Request] = []
        self.num_retractions = 0

    def decodable(self) -> list[Request]:
        return [r for r in self.running if self._may_decode(r)]

    def batch_to_mix(self, prefill_budget: int) -> list[Request]:
        """The running requests a mixed prefill step also decodes: none when they would leave no
        budget for the prefill or do not fit in memory."""
        if not self.running:
            return []
        batch = self.decodable()
        if len(batch) >= prefill_budget:
            return []
        if not self.kv.decode_fits(batch):
            return []
        return batch

    def plan_decodes(self, plan: StepInput, batch: list[Request], drafts: bool = True) -> None:
        slots = self.kv.alloc_decode(batch)
        if slots is None:
            raise RuntimeError("KV pool cannot hold one more token for a lone request")
        if self.disable_by_batch_size is not None and len(batch) > self.disable_by_batch_size:
            drafts = False
        # Drafts beyond the executor's largest graph would send the step down the eager path.
        rows_left = self.max_verify_rows - len(batch) if self.max_verify_rows else None
        tree_rows_left = self.max_tree_rows  # the executor's spare rows (common/draft_tree.py)
        for req, slot in zip(batch, slots):
            req.slots.append(slot)
            new_slots = [slot]
            draft, parents = self._draft(req, tree_rows_left) if drafts else ([], [])
            if rows_left is not None:
                # Tree nodes come in breadth-first order: any first k of them are a tree.
                draft, parents = draft[: max(0, rows_left)], parents[: max(0, rows_left)]
            if is_chain(parents):
                parents = []
            if draft:
                more = self.kv.alloc_draft(req.slots, len(draft))
                if more is None:
                    draft = []
                else:
                    req.slots += more
                    new_slots += more
                    if rows_left is not None:
                        rows_left -= len(draft)
                    if parents:
                        tree_rows_left -= len(draft)
            if not draft:
                parents = []
            req.drafts_inflight, req.draft_parents_inflight = draft, parents
            plan.continuing_requests.append(
                ContinuingRequest(
                    req.request_id,
                    new_slots=new_slots,
                    token_bitmask=allowed_tokens(req),
                    draft_ids=draft,
                    draft_parents=parents,
                )
            )

    def speculates(self, req: Request) -> bool:
        return self.spec is not None and may_speculate(req)

    def _draft(self, req: Request, tree_rows_left: int) -> tuple[list[int], list[int]]:
        """req's draft and its parents (empty: a chain). A tree only while the step's trees fit
        the executor's spare rows; past them, the request drafts a chain."""
        if not self.speculates(req) or req.inflight:
            return [], []
        fits = tree_rows_left >= self.spec.max_draft_tokens
        if isinstance(self.spec, EagleParams):  # the executor's proposal, a chain or a tree
            draft = draft_for(req, self.spec, self.context_length)
            parents = req.proposed_draft_parents[: len(draft)]
            if is_chain(parents):
                return draft, []
            return (draft, parents) if fits else (first_chain(draft, parents), [])
        if drafts_trees(self.spec) and fits:
            return draft_tree_for(req, self.spec, self.context_length)
        return draft_for(req, self.spec, self.context_length), []

    def retract_until_decode_fits(self, prefill: PrefillManager) -> list[str]:
        """Retract requests until memory holds one more token of each running one (a lone request
        always stays); the ids of the retracted ones, in retraction order."""
        retracted = []
        # The chunked request goes first: it is the newest admission and has decoded nothing.
        # (Only a serial schedule() retracts, so none of its chunks is in flight.)
        if prefill.chunked is not None and not self.kv.decode_fits(self.running):
            retracted.append(self._retract(prefill.chunked, prefill))
        while len(self.running) > 1 and not self.kv.decode_fits(self.running):
            retracted.append(self._retract(max(self.running, key=lambda r: r.admit_seq), prefill))
        return retracted

    def _retract(self, req: Request, prefill: PrefillManager) -> str:
        """Send an admitted request back to the queue; its computed KV stays in the cache."""
        if req is not prefill.chunked:
            self.running.remove(req)
        self.kv.release(req)
        req.proposed_draft_ids = []  # its re-prefill brings a new proposal
        req.proposed_draft_parents = []
        prefill.requeue(req)
        self.num_retractions += 1
        self.ratio.bump()
        return req.request_id

    def _may_decode(self, req: Request) -> bool:
        """Whether a decode of req may be planned now: not when the steps in flight already finish
        it, nor when its grammar's mask or its draft waits for the token a step in flight samples."""
        if req.inflight and (req.grammar is not None or self.speculates(req)):
            return False
        return not self._finishes_in_flight(req)

    def _finishes_in_flight(self, req: Request) -> bool:
        """Whether the steps in flight already bring req to max_new_tokens or the context length."""
        return bool(req.inflight) and (
            len(req.output_ids) + req.inflight >= req.stopping.max_new_tokens
            or req.seq_len + req.inflight >= self.context_length
        )
