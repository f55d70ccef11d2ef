"""EAGLE / EAGLE3 in the runner (docs/speculative.md, "EAGLE: the plan"): the draft head loaded beside
the target, its KV pool counted in the KV budget, and after every step the head run over the
positions the step kept, proposing the next step's drafts of each request that sampled.

Kept positions, per request of the step: a prefill chunk's tokens; a decode's one token; a verify
step's last token and its accepted drafts (the rejected ones need no draft K/V: they are past the
sequence, and their slots go back to the scheduler's pool). The token after each kept position is
known on the host (the chunk's next id, an accepted draft) except after the last one of a request
that sampled: that is the token just sampled, read from the SlotTable's next_tokens on the device.
The last position of a chunk that does not sample waits (RequestState.draft_pending: its hidden row
and slot) until the next chunk brings the token after it.

After a verify step the accepted counts stay on the device: the head runs over all of a chain's
positions (the last token and every draft: host-known shapes), or a tree's root and as many positions
as the tree is deep (the hidden rows of its accepted path's nodes, gathered on the device from
DeviceVerify.rows; staged slots, eagle_proposer.py), the token after each being the verify's
(DeviceVerify.tokens), and the proposer keeps the first 1 + accepted of them on the device (the draft
from that row, rounds 2..K from there; why the rows past them do no harm is argued there). So
_propose queues the head without waiting for the verify step; ModelRunner.collect reads the counts.
A request whose verified positions would run past the context's end (an upper bound: all kept) gets
no proposal.

Every sampled request's draft K/V is kept up to date, speculating or not, so a request may start
drafting at any step (after min_new_tokens, say); the proposals of requests that may not speculate
are returned and ignored by the scheduler.

The hidden rows a head reads (head_rows) come from the target's forward, or, for decode and verify
steps under CUDA graphs, from the rows the graph keeps for it (cuda_graph_runner.py, keep_hidden): the
same rows in the same order, so the head cannot tell the two apart. The head's round 1 (an extend
over the kept positions) runs eagerly; under CUDA graphs its rounds 2..K replay graphs of their own
(eagle_graphs.py, capture_rounds).

STANDALONE (models/standalone.py): a whole draft model instead of a head, reading the token at each
kept position (the step's own input ids, on the device) rather than the target's hidden state and
the token after it; nothing waits for the next chunk, and the target may be any causal LM. After a
verify step it takes the same path as a head (all verified positions, the count on the device).
"""

from __future__ import annotations

import logging

import torch

from radixserve.executor.host_copy import to_device
from radixserve.common.draft_tree import depths
from radixserve.common.model_files import resolve_model_path
from radixserve.common.step import StepInput
from radixserve.executor.attention.backend import AttentionBackend
from radixserve.executor.attention.metadata import ForwardBatch
from radixserve.executor.eagle_proposer import DraftRequest, EagleProposer
from radixserve.executor.kv_cache import kv_bytes_per_token
from radixserve.executor.models.eagle import load_draft_model
from radixserve.executor.models.llama import LlamaForCausalLM
from radixserve.executor.models.standalone import load_standalone_draft
from radixserve.executor.spec_verify import DeviceVerify
from radixserve.scheduler.speculation import EagleParams

log = logging.getLogger("radixserve.executor.eagle_step")

# Tree rounds (topk > 1) replay graphs of up to this many branch rows (max_bs * topk, at most this).
MAX_TREE_ROUND_ROWS = 512


class EagleStep:
    def __init__(
        self,
        params: EagleParams,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        download_dir: str | None = None,
        load_format: str = "auto",
        seed: int | None = None,
    ):
        """Load params' head (a folder, or a hub id fetched like the target's) for model (a
        Llama-family target: its forward keeps the hidden states the head reads), or its STANDALONE
        draft model (random weights when load_format, the target's, is dummy); ValueError when the
        draft or the target cannot serve."""
        standalone = params.algorithm == "STANDALONE"
        if not standalone and (
            not isinstance(model, LlamaForCausalLM)
            or type(model).forward is not LlamaForCausalLM.forward
        ):
            raise ValueError(
                f"--speculative-algorithm {params.algorithm}: draft heads are wired for targets "
                f"that run the Llama family's forward; {type(model).__name__} has its own"
            )
        folder = resolve_model_path(params.draft_model_path, download_dir=download_dir)
        self.head = (
            load_standalone_draft(folder, model, device, load_format, seed)
            if standalone
            else load_draft_model(params.algorithm, folder, model, device)
        )
        self.num_steps, self.device, self.dtype = params.num_steps, device, dtype
        # topk > 1: tree proposals of num_draft_tokens - 1 nodes (EagleProposer.propose_tree).
        self.topk, self.tree_nodes = params.topk, params.max_draft_tokens
        # EAGLE3 reads the inputs of some target layers; EAGLE the target's output.
        self.capture = tuple(getattr(self.head, "capture_layers", ()))
        # EAGLE heads read the target's hidden states; a STANDALONE draft model only token ids.
        self.reads_hidden_states = not getattr(self.head, "reads_own_token", False)
        model.capture_hidden_layers = self.capture
        self.model = model
        layers, kv_heads, head_dim = self.head.kv_shape
        self.kv_bytes_per_token = kv_bytes_per_token(layers, kv_heads, head_dim, dtype)
        self.proposer: EagleProposer | None = None
        log.info(
            "%s draft %s from %s: %s per step, %d bytes of draft KV per token",
            params.algorithm,
            "model" if standalone else "head",
            params.draft_model_path,
            f"{self.num_steps} draft tokens"
            if self.topk == 1
            else f"a tree of {self.tree_nodes} draft tokens ({self.num_steps} rounds, topk {self.topk})",
            self.kv_bytes_per_token,
        )

    def build(self, num_slots: int, max_requests: int, attn_backend: AttentionBackend) -> None:
        """The proposer over the target pool's slot ids (num_slots) and its scratch slots."""
        self.proposer = EagleProposer(
            self.head,
            num_slots,
            max_requests,
            self.num_steps,
            attn_backend,
            self.device,
            self.dtype,
            topk=self.topk,
        )

    def capture_rounds(self, kind, max_bs: int, table_width: int) -> None:
        """A head's decode rounds (2..K) in graphs of kind (DraftRoundGraphs, or a stand-in in
        tests) for up to max_bs requests; a STANDALONE draft model's stay eager."""
        if not self.reads_hidden_states or self.num_steps < 2:
            return
        width = min(table_width, self.proposer.max_positions)
        # A tree's rows are its branches: topk per request (bounded: more run eagerly).
        rows = min(max_bs, self.proposer.max_requests) * self.topk
        rows = min(rows, max(max_bs, MAX_TREE_ROUND_ROWS))
        self.proposer.round_graphs = kind(self.proposer, rows, width, self.dtype)

    def head_rows(
        self, hidden: torch.Tensor | None, captured: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """What the head reads at each token of the target's step, one row per token in the step's
        order: EAGLE the target's final hidden states (hidden: the forward's output, or a CUDA-graph
        replay's kept rows), EAGLE3 the captured layer inputs (captured: a replay's; None: the eager
        forward's, model.captured_hidden); a STANDALONE draft model reads none (None)."""
        if not self.reads_hidden_states:
            return None
        if not self.capture:
            return hidden
        return captured if captured is not None else self.model.captured_hidden

    def after_step(
        self,
        step: StepInput,
        batch: ForwardBatch,
        states: torch.Tensor | None,
        table: torch.Tensor,
        next_tokens: torch.Tensor,
        verified: tuple[list[str], DeviceVerify] | None = None,
    ) -> tuple[list[str], torch.Tensor, torch.Tensor | None] | None:
        """Run the head over the step's kept positions; (request ids, their drafts [B, K] and,
        for trees, their parents, on the device) of the requests that sampled, or None when none
        did. states: head_rows of the target's step; table, next_tokens: the SlotTable's; verified:
        after a verify step, its requests (in the order of its rows) and its tokens, accepted
        counts (and for trees the rows of the accepted paths) on the device, never read here."""
        own_tokens = self.proposer.extra  # a draft model: position p reads token p, no hidden state
        by_id = {r.request_id: r for r in step.new_requests}
        by_id.update({r.request_id: r for r in step.continuing_requests})
        first_at: list[int] = []  # own_tokens: each draft request's first kept position in batch
        limit = min(table.shape[1], self.proposer.max_positions)
        requests: list[DraftRequest] = []
        rows: list[torch.Tensor] = []
        sampled: list[str] = []
        last_rows: list[int] = []  # per draft request: its table row if it sampled, else -1
        verify_rows = {rid: i for i, rid in enumerate(verified[0])} if verified else {}
        for (rid, start, prefix, n), state in zip(batch.seq_spans, batch.seq_states):
            req = by_id[rid]
            tokens = list(req.input_ids)
            parents = list(getattr(req, "draft_parents", ()))
            verify_row, staged = -1, False
            if tokens:  # a prefill chunk: the token after each position is the prompt's next
                kept, next_ids = n, tokens[1:] + [0]
            elif n == 1:  # a decode: its token, then the one just sampled (last_tokens)
                kept, next_ids = 1, [0]
            else:  # a verify: the tokens are the verify's, the kept count on the device
                verify_row = verify_rows[rid]
                staged = bool(parents)  # a tree: the root, then as many positions as it is deep
                kept = 1 + max(depths(parents)) if staged else n
                next_ids = [0] * kept
            slots, first = [0] * kept if staged else list(req.new_slots[:kept]), prefix
            if own_tokens:  # (no hidden rows)
                pieces = []
            elif staged:  # the root's row, then the accepted path's (junk past it)
                path_rows = verified[1].rows[verify_row, :kept].clamp(min=0)
                pieces = [states.index_select(0, start + path_rows.to(states.device))]
            else:
                pieces = [states[start : start + kept]]
            if not own_tokens:  # a head at p reads p + 1's token: the chunk's last one waits
                pending, state.draft_pending = state.draft_pending, None
                if pending is not None and tokens:
                    row, slot = pending
                    pieces.insert(0, row)
                    slots.insert(0, slot)
                    next_ids.insert(0, tokens[0])
                    first -= 1
                if not req.sample:  # its last token's next id comes with the next chunk
                    state.draft_pending = (
                        states[start + kept - 1 : start + kept].clone(),
                        slots[-1],
                    )
                    slots, next_ids = slots[:-1], next_ids[:-1]
                    pieces[-1] = pieces[-1][:-1]
            need = self.proposer.positions_needed(first + len(slots), self.num_steps)
            if not slots or need > limit:
                continue  # nothing to run, or no room to draft before the context's end
            requests.append(
                DraftRequest(state.table_row, first, next_ids, slots, verify_row, staged)
            )
            if pieces:
                rows.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
            first_at.append(start)  # (own_tokens: the step's input id there is the first token)
            last_rows.append(state.table_row if req.sample else -1)
            if req.sample:
                sampled.append(rid)
        if not requests:
            return None
        at = to_device(last_rows, next_tokens.device, torch.int64)
        last_tokens = torch.where(at >= 0, next_tokens.index_select(0, at.clamp(min=0)), -1)
        # Only chunks that do not sample: one round writes their draft K/V, no draft is wanted.
        k = self.num_steps if sampled else 1
        if own_tokens:
            at = to_device(first_at, batch.input_ids.device, torch.int64)
            hidden_rows, first_tokens = None, batch.input_ids.index_select(0, at).to(self.device)
        else:
            hidden_rows, first_tokens = torch.cat(rows), None
        parents = None
        if sampled and self.topk > 1:
            drafts, parents = self.proposer.propose_tree(
                table,
                requests,
                hidden_rows,
                k,
                self.tree_nodes,
                last_tokens.to(self.device),
                verified[1] if verified else None,
            )
        else:
            drafts = self.proposer.propose(
                table,
                requests,
                hidden_rows,
                k,
                last_tokens.to(self.device),
                first_tokens,
                verified[1] if verified else None,
            )
        if not sampled:
            return None
        keep = to_device([i for i, r in enumerate(last_rows) if r >= 0], drafts.device, torch.int64)
        if parents is not None:
            parents = parents.index_select(0, keep)
        return sampled, drafts.index_select(0, keep), parents
