"""EAGLE drafting on the executor: run a draft head (models/eagle.py) K times per request, a chain with
top-1 (greedy) choices, and return K draft tokens per request in the target's vocabulary
(docs/speculative.md, "EAGLE: the plan").

Per request the caller hands over the positions the target has just run and kept (after a prefill
chunk: its tokens; after a decode: its token; after a verify step: below): the target's hidden
states there (rows of one tensor, in request order), the token that follows each position (input ids
shifted by one: at the last position, the token the target has just sampled), the positions' target
slots, and how many positions before them already have draft K/V (prefix_len). Round 1, an extend
over those positions, writes the draft's K/V there and proposes the first token; rounds 2..K, decodes,
each run one position further on the head's own output and the token proposed last.

The draft's KV pool has one layer per draft layer and the target's slot ids: slot s holds the draft
K/V of the position whose target K/V is at s, so the scheduler's slots cover both and freeing a slot
frees both. Rounds 2..K run positions that have no target slot yet; their K/V goes to scratch slots
past the target's ([num_slots, num_slots + max_requests * (max_steps - 1))), read only within one
propose call: the next call's extend rewrites those positions at their own slots, from the target's
hidden states.

Attention reads a private slot table: the requests' rows of the target's SlotTable (their prefix),
then these positions' slots, then (from round 2 on) their scratch slots; the target's table is never
written.

After a verify step (spec_verify.DeviceVerify: its tokens and accepted counts, on the device) a chain's positions
are all the step ran: its last token and its n - 1 drafts, of which the host does not know how many
were kept (1 + a, a the accepted count). (A tree's are its root and as many positions as the tree is
deep, the accepted path first; their slots are unknown on the host, so round 1 writes staging slots
and `_unstage` copies the kept ones' K/V to the path's slots on the device: DraftRequest.staged.) Round 1 runs them all (host-known shapes); every
value that depends on a stays on the device: the token after verified position i is the verify's
token i (for i < a draft i + 1, at i = a the target's corrected or bonus token), the draft comes from
round 1's row a, and rounds 2..K run at positions seq_len - (n - 1 - a) + ... with device-side lengths
and the private table's scratch columns scattered on the device from there, after round 1 (round 1's
rows past a read their own slots, written in that round: never a scratch slot's stale K/V, which a
masked extend would multiply by zero, NaN included). No host read of a (which on a GPU waits for the
stream to drain): the host learns it in ModelRunner.collect.

Why the rows past a do no harm: they write draft K/V at the slots of rejected drafts, computed from
wrong inputs. Within the call nothing reads them: round 1 is causal (row i <= a reads positions <= i)
and rounds 2..K read the private table up to their device length, whose columns from the first
position past the kept ones are scratch slots. After the call those slots hold draft K/V of positions
past the request's length: ModelRunner.collect takes the rejected drafts off the length, and the
scheduler, once it has the step's output, frees their slots (scheduler/kv_accounting.py, keep_slots).
Whoever gets such a slot next writes it in a step launched after this one: the target's K/V in its
forward, then the draft's in this proposer's round 1 over its kept positions, on the same stream, so
after this call's writes; every extend stores its rows' K/V before any row attends, and no draft K/V
is read at a position before a round 1 has written it (a radix-cache hit reads only positions the
cache holds: accepted ones, whose rows here had the right inputs).

A STANDALONE draft model (models/standalone.py, `reads_own_token`) reads token p at position p, not
token p + 1 with the target's hidden state at p: round 1 then runs the request's first position's own
token (`first_tokens`) and next_token_ids at positions prefix_len .. seq_len, one further than a
head, the last one (the token just sampled) at a scratch slot; each request has max_steps scratch
slots instead of max_steps - 1, and no hidden states are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.executor.host_copy import to_device
from radixserve.executor.attention.backend import AttentionBackend
from radixserve.executor.attention.metadata import (
    ExtendSeq,
    ForwardBatch,
    TableMeta,
    forward_context,
)
from radixserve.executor.kv_cache import KVPool
from radixserve.executor.spec_verify import DeviceVerify


@dataclass
class DraftRequest:
    """One request's positions to draft from."""

    row: int  # its row in the target's SlotTable: the slots of positions 0 .. prefix_len - 1
    prefix_len: int  # positions before these whose draft K/V is already in the pool
    next_token_ids: list[int]  # per position run, the token at the position after it (target ids)
    slots: list[int]  # the target slots of positions prefix_len .. prefix_len + n - 1
    # A verify step's request: its row in propose's `verified` tensors (-1: none). Its positions are
    # the step's (a chain: the last token, then every draft; a tree: the root, then as many positions
    # as the tree is deep), next_token_ids placeholders: the tokens are the verify's, and only the
    # first 1 + accepted positions are kept (on the device).
    verify_row: int = -1
    # A tree's verified path: its positions' slots are unknown on the host (which branch was
    # accepted), so slots holds placeholders; round 1 writes staging slots of the proposer's, whose
    # K/V then go, on the device, to the slots the target's row holds at positions prefix_len ..
    # (ModelRunner._keep_tree_paths put the path's slots there).
    staged: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.slots)

    @property
    def seq_len(self) -> int:
        return self.prefix_len + len(self.slots)


class EagleProposer:
    def __init__(
        self,
        draft,
        num_slots: int,
        max_requests: int,
        max_steps: int,
        attn_backend: AttentionBackend,
        device: torch.device,
        kv_dtype: torch.dtype,
        keep_logits: bool = False,
        topk: int = 1,
    ):
        """draft: an EagleDraftModel / Eagle3DraftModel / StandaloneDraftModel; num_slots: the target pool's slot count
        (slot 0 the padding sink); max_requests, max_steps: bounds of one propose call;
        keep_logits: keep each round's draft logits [B, draft vocab] in `logits` (tests);
        topk: branches per round of a tree proposal (propose_tree), 1 for chains only."""
        if max_requests < 1 or max_steps < 1:
            raise ValueError("max_requests and max_steps must be at least 1")
        self.draft, self.attn_backend, self.device = draft, attn_backend, device
        self.num_slots, self.max_requests, self.max_steps = num_slots, max_requests, max_steps
        layers, kv_heads, head_dim = draft.kv_shape
        # 1 for a draft model reading its own token: every request runs one position further.
        self.extra = int(getattr(draft, "reads_own_token", False))
        self.topk = topk
        # Rounds 2..K of a tree run topk branches each, each with a scratch slot of its own; after a
        # tree verify step round 1 writes a request's root and path (at most max_steps deep) to
        # staging slots of its own (DraftRequest.staged), past those.
        self.staging = max_steps + 1 if topk > 1 else 0
        self.scratch_per = (max_steps - 1) * topk + self.extra + self.staging
        scratch = max_requests * self.scratch_per
        self.kv_pool = KVPool(num_slots + scratch, layers, kv_heads, head_dim, kv_dtype, device)
        self.max_positions = draft.rotary_emb.cos_table.shape[0]
        self.keep_logits = keep_logits
        self.logits: list[torch.Tensor] = []
        # Rounds 2..K replayed from CUDA graphs where they fit (eagle_graphs.py); None: eager.
        self.round_graphs = None

    def positions_needed(self, seq_len: int, k: int) -> int:
        """Positions a request of seq_len kept positions runs to when drafting k tokens."""
        return seq_len + self.extra + k - 1

    def _validate(
        self,
        table: torch.Tensor,
        requests: list[DraftRequest],
        hidden: torch.Tensor | None,
        k: int,
        first_tokens: torch.Tensor | None,
        verified: DeviceVerify | None = None,
    ):
        if not 1 <= len(requests) <= self.max_requests:
            raise ValueError(f"{len(requests)} requests; one call drafts 1..{self.max_requests}")
        if not 1 <= k <= self.max_steps:
            raise ValueError(f"{k} draft steps; 1..{self.max_steps} allowed")
        total = 0
        for r in requests:
            n = r.num_tokens
            if n < 1 or len(r.next_token_ids) != n:
                raise ValueError(
                    f"row {r.row}: {len(r.next_token_ids)} token ids for {n} slots (need >= 1)"
                )
            if r.staged and (r.verify_row < 0 or n > self.staging):
                raise ValueError(
                    f"row {r.row}: {n} staged positions ({self.staging} staging slots)"
                )
            if not r.staged and (min(r.slots) < 1 or max(r.slots) >= self.num_slots):
                raise ValueError(f"row {r.row}: slot ids must be in 1..{self.num_slots - 1}")
            if r.prefix_len < 0 or self.positions_needed(r.seq_len, k) > min(
                table.shape[1], self.max_positions
            ):
                raise ValueError(
                    f"row {r.row}: {r.seq_len} positions + {k - 1 + self.extra} drafted exceed "
                    "the context"
                )
            if r.verify_row >= 0 and (
                verified is None
                or not 0 <= r.verify_row < verified.tokens.shape[0]
                or n > verified.tokens.shape[1]
            ):
                raise ValueError(f"row {r.row}: no verified tokens at row {r.verify_row} for {n}")
            total += n
        if self.extra:
            if first_tokens is None or first_tokens.shape != (len(requests),):
                raise ValueError("a draft model reading its own tokens needs first_tokens [B]")
        elif hidden is None or hidden.shape[0] != total:
            rows = None if hidden is None else hidden.shape[0]
            raise ValueError(f"{rows} hidden rows for {total} positions")

    @torch.inference_mode()
    def propose(
        self,
        table: torch.Tensor,
        requests: list[DraftRequest],
        hidden: torch.Tensor | None,
        k: int,
        last_tokens: torch.Tensor | None = None,
        first_tokens: torch.Tensor | None = None,
        verified: DeviceVerify | None = None,
    ) -> torch.Tensor:
        """Draft tokens [B, k] (target ids, int64, on the device) of each request, in order.
        table: the target's SlotTable tensor; hidden: [sum of positions, width] the target's hidden
        states at the requests' positions (EAGLE: its output; EAGLE3: the captured layer inputs).
        last_tokens: [B] on the device, each request's last next_token_ids entry where not negative
        (the token just sampled, not read back to the host). A draft model reading its own tokens:
        hidden None, first_tokens [B] on the device, each request's token at position prefix_len.
        verified: the chain verify step that requests with a verify_row come from (module doc)."""
        self._validate(table, requests, hidden, k, first_tokens, verified)
        self.logits = []
        device, scratch_per, extra = self.device, self.scratch_per, self.extra
        batch = len(requests)
        lens = [r.seq_len + extra for r in requests]  # positions run in round 1, prefix included
        private = self._private_table(table, requests, k)
        step, last, kept_lens = self._first_round(
            private, requests, last_tokens, first_tokens, verified
        )
        token, own = self._run(step, hidden, last)
        self._unstage(table, requests, verified)
        drafts = [token]
        if k == 1:
            return torch.stack(drafts, dim=1)

        def tensor(values):
            return to_device(values, device, torch.int64)

        # Rounds 2..k: one position further each, on the head's own output; round j + 1 writes
        # position kept_len + j - 1 at scratch slot extra + j - 1 (after round 1: module docstring).
        self._scratch_columns(private, kept_lens, k)
        rows = torch.arange(batch, dtype=torch.int64, device=device)
        graphs = self.round_graphs
        if graphs is not None and graphs.can_run(batch, private.shape[1]):
            scratch = tensor([self.num_slots + i * scratch_per + extra for i in range(batch)])
            drafts += graphs.rounds(private, kept_lens, scratch, token, own, k)
            return torch.stack(drafts, dim=1)
        if not self.attn_backend.supports_cuda_graphs:
            # A backend that reads host lengths (torch_native): exact ones (on a GPU, a sync).
            lens = kept_lens.tolist()
        empty = tensor([])
        for j in range(1, k):
            scratch = [self.num_slots + i * scratch_per + extra + j - 1 for i in range(batch)]
            seq_lens = kept_lens + j
            meta = TableMeta(private, rows, seq_lens, empty, empty, empty, 0)
            step = ForwardBatch(
                token,
                seq_lens - 1,
                tensor(scratch),
                [],
                0,
                [n + j for n in lens],  # host lengths: exact, or upper bounds a backend never reads
                self.kv_pool,
                self.attn_backend,
                meta,
            )
            token, own = self._run(step, own, None)
            drafts.append(token)
        return torch.stack(drafts, dim=1)

    def _first_round(self, private, requests, last_tokens, first_tokens, verified=None):
        """Round 1's step, an extend over each request's positions (one further reading own
        tokens), each request's last kept row in it, and each one's positions after round 1 counting
        only the kept ones [B] on the device (after a verify step they follow its accepted counts)."""
        device, scratch_per, extra = self.device, self.scratch_per, self.extra
        batch = len(requests)
        lens = [r.seq_len + extra for r in requests]
        starts, ids, positions, slots = [], [], [], []
        for i, r in enumerate(requests):
            starts.append(len(ids))
            ids += [0] * extra + r.next_token_ids  # the first token: first_tokens, on the device
            positions += range(r.prefix_len, r.seq_len + extra)
            slots += self._round1_slots(i, r) + [
                self.num_slots + i * scratch_per + j for j in range(extra)
            ]
        extend = [
            ExtendSeq(s, r.num_tokens + extra, r.prefix_len, i)
            for i, (s, r) in enumerate(zip(starts, requests))
        ]

        def tensor(values):
            return to_device(values, device, torch.int64)

        rows = torch.arange(batch, dtype=torch.int64, device=device)
        lens_t = tensor(lens)
        meta = TableMeta(
            private,
            rows,
            lens_t,
            tensor([r.prefix_len for r in requests]),
            tensor(starts),
            tensor([r.num_tokens + extra for r in requests]),
            max(r.num_tokens for r in requests) + extra,
        )
        last = tensor([s + r.num_tokens + extra - 1 for s, r in zip(starts, requests)])
        ids_t = tensor(ids)
        if extra:
            ids_t[tensor(starts)] = first_tokens.to(ids_t.dtype)
        # Positions past each request's kept ones (after a verify step: its rejected drafts), on the
        # device; None: every position is kept.
        past = self._verified_tokens(requests, verified, ids_t, starts) if verified else None
        if past is not None:
            last = last - past
        if last_tokens is not None:
            ids_t[last] = torch.where(last_tokens >= 0, last_tokens, ids_t[last])
        step = ForwardBatch(
            ids_t,
            tensor(positions),
            tensor(slots),
            extend,
            len(ids),
            [],
            self.kv_pool,
            self.attn_backend,
            meta,
        )
        return step, last, lens_t if past is None else lens_t - past

    def _verified_tokens(
        self,
        requests: list[DraftRequest],
        verified: DeviceVerify,
        ids: torch.Tensor,
        starts: list[int],
    ) -> torch.Tensor | None:
        """Write the verify's tokens into round 1's ids at each verified request's positions (after
        the own token of a draft model reading its own); its positions past the kept ones [B] (0 for
        the other requests), computed on the device. None when no request comes from the verify."""
        at, src_rows, src_cols = [], [], []
        for r, s in zip(requests, starts):
            if r.verify_row >= 0:
                at += range(s + self.extra, s + self.extra + r.num_tokens)
                src_rows += [r.verify_row] * r.num_tokens
                src_cols += range(r.num_tokens)
        if not at:
            return None
        index = to_device([at, src_rows, src_cols], self.device, torch.int64)
        tokens = verified.tokens.to(self.device)
        ids[index[0]] = tokens[index[1], index[2]].clamp(min=0)  # -1 past the accepted: any id
        per = to_device(
            [
                [max(r.verify_row, 0) for r in requests],
                [r.num_tokens - 1 if r.verify_row >= 0 else 0 for r in requests],
                [int(r.verify_row >= 0) for r in requests],
            ],
            self.device,
            torch.int64,
        )
        accepted = verified.num_accepted.to(self.device).index_select(0, per[0])
        return (per[1] - accepted) * per[2]

    @torch.inference_mode()
    def propose_tree(
        self,
        table: torch.Tensor,
        requests: list[DraftRequest],
        hidden: torch.Tensor,
        k: int,
        num_nodes: int,
        last_tokens: torch.Tensor | None = None,
        verified: DeviceVerify | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A tree draft per request (EAGLE-2's beam): round 1 as propose's; each of rounds 2..k runs
        the topk branches kept so far (one decode row each, on a private table row holding the
        request's prefix then the branch's own scratch slots) and keeps the topk likeliest of their
        topk * topk children, by the product of the head's probabilities along the branch. Of every
        node ranked (topk + (k - 1) * topk^2), the num_nodes likeliest make the tree.

        Returns tokens and parents [B, num_nodes] (target ids; parents as draft_tree.py's: -1 for
        a child of the root, else an earlier node's index), on the device. A child's likelihood never
        exceeds its parent's (ties go to the shallower node), so every kept node's parent is kept;
        siblings come from one top-k, so their tokens differ. verified: as propose's (a request's
        kept positions, after a verify step, decided on the device)."""
        self._validate(table, requests, hidden, k, None, verified)
        topk, extra = self.topk, self.extra
        if topk < 2 or extra:
            raise ValueError("tree proposals need topk > 1 and a draft head (not a draft model)")
        if not 1 <= num_nodes <= topk + (k - 1) * topk * topk:
            raise ValueError(f"{num_nodes} nodes: the rounds rank {topk + (k - 1) * topk**2}")
        self.logits = []
        device, batch = self.device, len(requests)
        private = self._private_table(table, requests, k)
        step, last, kept_lens = self._first_round(private, requests, last_tokens, None, verified)
        with forward_context(step):
            to_logits, own = self.draft(step.input_ids, step.positions, hidden)
        self._unstage(table, requests, verified)
        score, token = self._top(to_logits.index_select(0, last))  # [B, topk] each
        own = own.index_select(0, last)
        scores, tokens, parents = [score], [token], [torch.full_like(token, -1)]
        depth = [torch.zeros_like(score)]
        node = torch.arange(topk, device=device).expand(batch, topk)  # each branch's node id
        branch_req = [i for i in range(batch) for _ in range(topk)]  # request of each branch row
        rows = to_device(branch_req, device, torch.int64)
        tables = private.index_select(0, rows)
        hid = own.index_select(0, rows)
        width = batch * topk
        lens = [requests[i].seq_len for i in branch_req]  # positions each branch has run (at most)
        # The same on the device: exact after a verify step (its accepted counts never on the host).
        lens_t = kept_lens[rows]
        if not self.attn_backend.supports_cuda_graphs:
            # A backend that reads host lengths (torch_native): exact ones (on a GPU, a sync).
            lens = lens_t.tolist()
        base = topk
        graphs = self.round_graphs
        graphs = graphs if graphs is not None and graphs.can_run(width, tables.shape[1]) else None
        for j in range(1, k):
            seq_lens = [n + j for n in lens]
            scratch = [
                self.num_slots + i * self.scratch_per + (j - 1) * topk + b % topk
                for b, i in enumerate(branch_req)
            ]
            positions = lens_t + (j - 1)
            scratch_t = to_device(scratch, device, torch.int64)
            branch = torch.arange(width, device=device)
            tables[branch, positions] = scratch_t
            if graphs is not None:  # (rounds 2..K of the tree: each branch a graph row)
                child_score, child_token, to_next = graphs.tree_round(
                    tables, positions, scratch_t, token.reshape(-1), hid
                )
            else:
                empty = to_device([], device, torch.int64)
                meta = TableMeta(tables, branch, positions + 1, empty, empty, empty, 0)
                step = ForwardBatch(
                    token.reshape(-1),
                    positions,
                    scratch_t,
                    [],
                    0,
                    seq_lens,  # host lengths: exact, or upper bounds a backend never reads
                    self.kv_pool,
                    self.attn_backend,
                    meta,
                )
                with forward_context(step):
                    to_logits, to_next = self.draft(step.input_ids, step.positions, hid)
                child_score, child_token = self._top(to_logits)  # [B * topk, topk]
            child_score = (score.reshape(-1, 1) + child_score).reshape(batch, topk * topk)
            child_token = child_token.reshape(batch, topk * topk)
            child_parent = node.reshape(batch, topk, 1).expand(batch, topk, topk)
            scores.append(child_score)
            tokens.append(child_token)
            parents.append(child_parent.reshape(batch, topk * topk))
            depth.append(torch.full_like(child_score, float(j)))
            best = child_score.topk(topk, dim=-1).indices  # [B, topk] of topk * topk
            score, token = child_score.gather(1, best), child_token.gather(1, best)
            node = base + best
            base += topk * topk
            source = (torch.arange(batch, device=device)[:, None] * topk + best // topk).reshape(-1)
            tables, hid = tables.index_select(0, source), to_next.index_select(0, source)
        return self._select(scores, tokens, parents, depth, num_nodes)

    def _top(self, to_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's topk (log-probability, target id) under the head, likeliest first; log
        probabilities floored at -1e4 so that products stay finite and ordered."""
        logits = self.draft.compute_logits(to_logits)
        if self.keep_logits:
            self.logits.append(logits)
        logp = torch.log_softmax(logits.float(), dim=-1).clamp(min=-1e4)
        value, index = logp.topk(self.topk, dim=-1)
        return value, self.draft.to_target_ids(index)

    @staticmethod
    def _select(scores, tokens, parents, depth, num_nodes: int):
        """The num_nodes likeliest of all ranked nodes, in node-id order (a parent before its
        children), with each one's parent as an index among them (-1: the root)."""
        score, token, parent = torch.cat(scores, 1), torch.cat(tokens, 1), torch.cat(parents, 1)
        # A child's score is its parent's plus a log-probability <= 0: ties go to the shallower.
        ranked = score - 1e-3 * torch.cat(depth, 1)
        keep = ranked.topk(num_nodes, dim=-1).indices.sort(dim=-1).values  # [B, num_nodes] ids
        parent_id = parent.gather(1, keep)
        same = keep[:, None, :] == parent_id[:, :, None]  # [B, node, candidate parent]
        index = torch.where(same.any(-1), same.to(torch.int64).argmax(-1), -1)
        return token.gather(1, keep), index

    def _run(self, step: ForwardBatch, hidden: torch.Tensor, last: torch.Tensor | None):
        """One draft forward: (each request's proposed target id [B], its next hidden [B, H])."""
        with forward_context(step):
            to_logits, to_next = self.draft(step.input_ids, step.positions, hidden)
        if last is not None:
            to_logits, to_next = to_logits.index_select(0, last), to_next.index_select(0, last)
        return self._proposed(to_logits), to_next

    def draft_round(self, step: ForwardBatch, hidden: torch.Tensor):
        """A decode round inside step's forward_context (the round graphs' forward): _run's
        results, no logits kept."""
        to_logits, to_next = self.draft(step.input_ids, step.positions, hidden)
        return self._proposed(to_logits, keep=False), to_next

    def _proposed(self, to_logits: torch.Tensor, keep: bool = True) -> torch.Tensor:
        """Each row's draft (argmax) in target ids; keep: into self.logits, if keep_logits."""
        logits = self.draft.compute_logits(to_logits)
        if keep and self.keep_logits:
            self.logits.append(logits)
        return self.draft.to_target_ids(logits.argmax(dim=-1))

    def _round1_slots(self, i: int, r: DraftRequest) -> list[int]:
        """The slots round 1 writes request i's positions to: its own, or (staged) its staging slots."""
        if not r.staged:
            return r.slots
        first = self.num_slots + (i + 1) * self.scratch_per - self.staging
        return list(range(first, first + r.num_tokens))

    def _unstage(
        self, table: torch.Tensor, requests: list[DraftRequest], verified: DeviceVerify | None
    ) -> None:
        """After round 1: each staged request's kept positions' draft K/V (the first 1 + accepted of
        its staging slots) copied to the slots the target's row holds at those positions (the rows
        past them onto themselves: every destination distinct). On the device, no host read."""
        src, rows, cols, verify_rows, steps = [], [], [], [], []
        for i, r in enumerate(requests):
            if r.staged:
                src += self._round1_slots(i, r)
                rows += [r.row] * r.num_tokens
                cols += range(r.prefix_len, r.seq_len)
                verify_rows += [r.verify_row] * r.num_tokens
                steps += range(r.num_tokens)
        if not src:
            return
        index = to_device([src, rows, cols, verify_rows, steps], self.device, torch.int64)
        kept = index[4] <= verified.num_accepted.to(self.device).index_select(0, index[3])
        target = table.to(self.device)[index[1], index[2]]
        dest = torch.where(kept, target, index[0])
        for cache in self.kv_pool.k + self.kv_pool.v:
            cache.index_copy_(0, dest, cache.index_select(0, index[0]))

    def _private_table(
        self, table: torch.Tensor, requests: list[DraftRequest], k: int
    ) -> torch.Tensor:
        """[B, longest + k - 1 (+ 1 reading own tokens)] slot ids: each request's target row up to
        its prefix, then its positions' slots (a draft model reading its own: then its first scratch
        slot); the columns past them are filled per round (_scratch_columns, propose_tree)."""
        width = max(self.positions_needed(r.seq_len, k) for r in requests)
        rows = to_device([r.row for r in requests], table.device, torch.int64)
        private = table[:, :width].index_select(0, rows).to(self.device)
        scratch_per, extra = self.scratch_per, self.extra
        at_rows, at_cols, values = [], [], []
        for i, r in enumerate(requests):
            new = self._round1_slots(i, r) + [
                self.num_slots + i * scratch_per + j for j in range(extra)
            ]
            at_rows += [i] * len(new)
            at_cols += range(r.prefix_len, r.prefix_len + len(new))
            values += new
        index = to_device([at_rows, at_cols, values], self.device, torch.int64)
        private.index_put_((index[0], index[1]), index[2])
        return private

    def _scratch_columns(self, private: torch.Tensor, kept_lens: torch.Tensor, k: int) -> None:
        """A chain's rounds 2..k: round j + 1 writes position kept_len + j - 1 at the request's
        scratch slot extra + j - 1; kept_lens [B] on the device."""
        steps = torch.arange(k - 1, dtype=torch.int64, device=self.device)
        first = (
            self.num_slots
            + self.extra
            + self.scratch_per
            * torch.arange(private.shape[0], dtype=torch.int64, device=self.device)
        )
        private.scatter_(1, kept_lens[:, None] + steps, first[:, None] + steps)
