"""Verification of speculative drafts, vectorised over the batch: each request brings a chain of
draft tokens d_0..d_{n-1} and the target's distribution at n + 1 positions (after the last accepted
token, then after each draft token); it keeps the longest acceptable prefix of its draft plus one
token of the target's own, so 1..n+1 tokens per step.

Greedy: a draft token is acceptable while it equals the target's argmax; the target's argmax at the
first mismatch (or after the whole draft) follows.

Sampling (Leviathan et al. 2023, Chen et al. 2023): d_i, drawn from the draft distribution q_i, is
accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from
normalize(max(p_i - q_i, 0)), after a fully accepted draft from p_n. Every emitted token is then
distributed exactly as the target's p. A draft made without a distribution (n-gram lookup, or a
greedy draft model) is a point mass: q_i(d_i) = 1, so d_i is kept with probability p_i(d_i) and the
residual is p_i without d_i.

Random draws follow sampling.py: the batch draws from the default generator, and each seeded request
redraws its own row from its torch.Generator (its n uniforms, then one exponential per vocab entry for
the final token, drawn by the exponential race), so its tokens do not depend on the batch around it.

Shapes: B requests, K = the longest draft, V the vocabulary; draft_tokens is [B, K] (entries past a
request's num_drafts are ignored), the target's rows are [B, K + 1, V] (pad_positions builds them from
the executor's flat rows).

Trees (verify_tree*): a request's drafts form a tree given by parents[i], -1 for a child of the root
(the last verified token) or the index of an earlier draft (parents[i] < i); siblings carry distinct
tokens, and a chain is parents = [-1, 0, 1, ..., n - 2]. Row 0 is the target's distribution at the
root, row i + 1 the one after draft i. Greedy: a draft is acceptable when its parent is (the root
always is) and its token is the argmax at its parent's row; the acceptable drafts form one path from
the root, emitted in depth order, then the argmax at the deepest one's row. Sampling (point-mass drafts
only): at the current node, with p its row, the children are tried in index order, child c with token
t accepted with probability p(t) / sum(p); an accepted child becomes the current node, a rejected one
leaves p with p(t) = 0; when no child is accepted, the final token is drawn from the current p. The
result's rows say which row produced each emitted token, hence which drafts were accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from radixserve.executor.host_copy import to_device, to_host


@dataclass
class VerifyResult:
    token_ids: list[list[int]]  # per request: its accepted draft tokens, then the target's token
    num_accepted: list[int]  # draft tokens accepted per request: len(token_ids[i]) - 1
    # Per request, the row that produced each of token_ids (DeviceVerify.rows); None for a chain.
    rows: list[list[int]] | None = None


@dataclass
class DeviceVerify:
    """A step's verified tokens, still on the device: tokens [B, K + 1] holds each request's
    num_accepted + 1 tokens, then -1. rows [B, K + 1] (tree verification) holds, for each emitted
    token, the row (within the request) whose distribution produced it: 0 for the first, then the row
    of the draft accepted before it (its draft index + 1), then -1; None for a chain, where token j
    comes from row j."""

    tokens: torch.Tensor
    num_accepted: torch.Tensor  # int64 [B]
    rows: torch.Tensor | None = None  # int64 [B, K + 1]

    def to_host(self) -> "DeviceVerify":
        """Copies in pinned host memory, made asynchronously on the current stream."""
        return DeviceVerify(to_host(self.tokens), to_host(self.num_accepted), to_host(self.rows))

    def result(self) -> VerifyResult:
        accepted = self.num_accepted.tolist()
        tokens = self.tokens.tolist()
        rows = None
        if self.rows is not None:
            rows = [r[: a + 1] for r, a in zip(self.rows.tolist(), accepted)]
        return VerifyResult([t[: a + 1] for t, a in zip(tokens, accepted)], accepted, rows)


def pad_positions(flat: torch.Tensor, num_drafts: list[int]) -> torch.Tensor:
    """[sum(n_i + 1), V] rows, request after request, as [B, K + 1, V]; a request's padding repeats
    its last row (so it stays a valid distribution)."""
    width = max(num_drafts, default=0) + 1
    index, start = [], 0
    for n in num_drafts:
        index.append([start + min(j, n) for j in range(width)])
        start += n + 1
    if start != flat.shape[0]:
        raise ValueError(f"{flat.shape[0]} rows for drafts of lengths {num_drafts}")
    index = to_device(index, flat.device, torch.int64).reshape(-1, width)
    return flat[index]


def verify_greedy(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, num_drafts: list[int]
) -> DeviceVerify:
    """Accept the longest prefix of each draft that equals the target's argmax, then that argmax.
    target_logits: [B, K + 1, V] logits, or any scores with the same argmax (probabilities)."""
    target = target_logits.argmax(dim=-1)
    matches = (draft_tokens == target[:, :-1]) & _valid(draft_tokens, num_drafts)
    num_accepted = _leading_true(matches)
    positions = torch.arange(target.shape[1], device=target.device)
    tokens = torch.where(positions[None, :] <= num_accepted[:, None], target, -1)
    return DeviceVerify(tokens, num_accepted)


def verify_sampling(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: list[int],
    draft_probs: torch.Tensor | None = None,
    generators: list[torch.Generator | None] | None = None,
    default_generator: torch.Generator | None = None,
) -> DeviceVerify:
    """Speculative rejection sampling. target_probs: [B, K + 1, V], the target's probabilities with
    temperature / top-k / top-p / min-p applied (rows need not sum to 1); draft_probs: [B, K, V], the
    distributions the draft tokens were drawn from, None for point-mass drafts; generators[i]: request
    i's seeded generator or None."""
    batch, width, vocab = target_probs.shape
    device = target_probs.device
    p = target_probs / target_probs.sum(dim=-1, keepdim=True)
    drafts = draft_tokens.clamp(min=0)
    rows = torch.arange(batch, device=device)
    uniforms, noise = _draws(
        batch, width - 1, vocab, num_drafts, generators, default_generator, p.dtype, device
    )

    p_draft = p[:, :-1].gather(2, drafts[..., None]).squeeze(2)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q = draft_probs / draft_probs.sum(dim=-1, keepdim=True)
        q_draft = q.gather(2, drafts[..., None]).squeeze(2)
    # u < p / q, written so that q = 0 (a draft its own distribution excludes) cannot divide by 0.
    accepted = (uniforms * q_draft < p_draft) & _valid(draft_tokens, num_drafts)
    num_accepted = _leading_true(accepted)

    p_next = p[rows, num_accepted]
    rejected = num_accepted < to_device(num_drafts, device)
    if width > 1:
        at = num_accepted.clamp(max=width - 2)
        if draft_probs is None:
            q_next = torch.zeros_like(p_next).scatter_(1, drafts[rows, at][:, None], 1.0)
        else:
            q_next = q[rows, at]
        residual = (p_next - q_next).clamp(min=0)
        # A rejection implies p(d) < q(d), hence residual mass; rounding alone could leave none.
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_next)
        weights = torch.where(rejected[:, None], residual, p_next)
    else:
        weights = p_next
    # An exponential of exactly 0 would turn a zero weight into NaN, which argmax would pick.
    final = (weights / noise.clamp(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)

    positions = torch.arange(width, device=device)
    padded = torch.cat([draft_tokens, final[:, None]], dim=1)
    tokens = torch.where(positions[None, :] < num_accepted[:, None], padded, -1)
    tokens.scatter_(1, num_accepted[:, None], final[:, None])
    return DeviceVerify(tokens, num_accepted)


def verify(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    num_drafts: list[int],
    greedy: list[bool],
    draft_probs: torch.Tensor | None = None,
    generators: list[torch.Generator | None] | None = None,
    default_generator: torch.Generator | None = None,
) -> DeviceVerify:
    """A batch mixing greedy requests (greedy[i]: argmax verification of row i) and sampled ones;
    greedy rows take no draws from their generators."""
    if all(greedy):
        return verify_greedy(target_probs, draft_tokens, num_drafts)
    gens = [None if g else gen for g, gen in zip(greedy, generators or [None] * len(greedy))]
    sampled = verify_sampling(
        target_probs, draft_tokens, num_drafts, draft_probs, gens, default_generator
    )
    if not any(greedy):
        return sampled
    return merge_greedy(greedy, verify_greedy(target_probs, draft_tokens, num_drafts), sampled)


def merge_greedy(greedy: list[bool], exact: DeviceVerify, sampled: DeviceVerify) -> DeviceVerify:
    """Request i's result from exact where greedy[i], else from sampled."""
    rows = to_device(greedy, exact.tokens.device)
    return DeviceVerify(
        torch.where(rows[:, None], exact.tokens, sampled.tokens),
        torch.where(rows, exact.num_accepted, sampled.num_accepted),
        None if exact.rows is None else torch.where(rows[:, None], exact.rows, sampled.rows),
    )


def verify_tree_greedy(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, parents: list[list[int]]
) -> DeviceVerify:
    """Accept the path of drafts whose tokens equal the target's argmax at their parents' rows, then
    the argmax at the deepest accepted draft's row. target_logits: [B, K + 1, V] logits, or any scores
    with the same argmax; parents[i]: request i's draft tree (module docstring). Should two siblings
    both match (their tokens are meant to be distinct), the first is taken."""
    target = target_logits.argmax(dim=-1)
    parent_rows, valid = _tree_index(parents, draft_tokens)
    matches = (draft_tokens == target.gather(1, parent_rows)) & valid
    on_path, taken = _tree_state(draft_tokens)
    for i in range(draft_tokens.shape[1]):
        parent = parent_rows[:, i : i + 1]
        accepted = matches[:, i : i + 1] & _reached(on_path, taken, parent)
        _accept(on_path, taken, parent, i, accepted)
    rows, num_accepted = _tree_rows(on_path)
    final = target.gather(1, rows.gather(1, num_accepted[:, None])).squeeze(1)
    return DeviceVerify(_tree_tokens(draft_tokens, rows, num_accepted, final), num_accepted, rows)


def verify_tree_sampling(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: list[list[int]],
    generators: list[torch.Generator | None] | None = None,
    default_generator: torch.Generator | None = None,
) -> DeviceVerify:
    """Rejection sampling over a tree of point-mass drafts. target_probs: [B, K + 1, V] as for
    verify_sampling; parents[i]: request i's draft tree (module docstring); generators[i]: request i's
    seeded generator or None, drawn from as verify_sampling draws (a uniform per draft, then an
    exponential per vocab entry).

    Lossless: at a node with distribution p, child t is emitted with probability p(t) and otherwise the
    token comes from p without t, renormalised, which by induction over the remaining children emits
    every token with probability p(token); an accepted child then continues with the target's
    distribution after it, so every emitted token is distributed as the target's.

    Vectorised over the batch by a loop over the K draft indices: a draft is tried when its parent is
    on the accepted path and no earlier sibling was accepted (every earlier sibling was then tried and
    rejected, so its parent's remaining mass is known)."""
    batch, width, vocab = target_probs.shape
    device = target_probs.device
    p = target_probs / target_probs.sum(dim=-1, keepdim=True)
    parent_rows, valid = _tree_index(parents, draft_tokens)
    drafts = draft_tokens.clamp(min=0)
    num_drafts = [len(tree) for tree in parents]
    uniforms, noise = _draws(
        batch, width - 1, vocab, num_drafts, generators, default_generator, p.dtype, device
    )

    # [B, K]: p at each draft's parent row, of the draft's token.
    p_draft = p[torch.arange(batch, device=device)[:, None], parent_rows, drafts]
    on_path, taken = _tree_state(draft_tokens)
    removed = torch.zeros(batch, width, dtype=p.dtype, device=device)  # rejected children's mass
    for i in range(width - 1):
        parent = parent_rows[:, i : i + 1]
        tried = valid[:, i : i + 1] & _reached(on_path, taken, parent)
        # u < p(t) / sum(p), the residual's sum being 1 less what the rejected siblings held.
        mass = 1 - removed.gather(1, parent)
        accepted = tried & (uniforms[:, i : i + 1] * mass < p_draft[:, i : i + 1])
        rejected = tried & ~accepted
        removed.scatter_add_(1, parent, torch.where(rejected, p_draft[:, i : i + 1], 0))
        _accept(on_path, taken, parent, i, accepted)
    rows, num_accepted = _tree_rows(on_path)

    # The final token: from the last accepted node's row, less its children (all tried, all rejected).
    last = rows.gather(1, num_accepted[:, None])
    p_last = p[torch.arange(batch, device=device), last.squeeze(1)]
    children = (parent_rows == last) & valid
    residual = torch.cat([p_last, torch.zeros_like(p_last[:, :1])], dim=1)
    residual.scatter_(1, torch.where(children, drafts, vocab), 0)
    residual = residual[:, :vocab]
    # A rejection leaves residual mass; rounding alone could leave none.
    weights = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_last)
    # An exponential of exactly 0 would turn a zero weight into NaN, which argmax would pick.
    final = (weights / noise.clamp(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
    return DeviceVerify(_tree_tokens(draft_tokens, rows, num_accepted, final), num_accepted, rows)


def verify_tree(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: list[list[int]],
    greedy: list[bool],
    generators: list[torch.Generator | None] | None = None,
    default_generator: torch.Generator | None = None,
) -> DeviceVerify:
    """verify for draft trees: greedy rows by verify_tree_greedy, the others by
    verify_tree_sampling; greedy rows take no draws from their generators."""
    if all(greedy):
        return verify_tree_greedy(target_probs, draft_tokens, parents)
    gens = [None if g else gen for g, gen in zip(greedy, generators or [None] * len(greedy))]
    sampled = verify_tree_sampling(target_probs, draft_tokens, parents, gens, default_generator)
    if not any(greedy):
        return sampled
    return merge_greedy(greedy, verify_tree_greedy(target_probs, draft_tokens, parents), sampled)


def _tree_index(
    parents: list[list[int]], draft_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K] int64, each draft's parent row (parents + 1; 0 past a request's drafts), and [B, K]
    bool, whether each draft position is within its request's tree."""
    batch, width = draft_tokens.shape
    if len(parents) != batch:
        raise ValueError(f"{len(parents)} draft trees for {batch} requests")
    index = []
    for tree in parents:
        if len(tree) > width:
            raise ValueError(f"a tree of {len(tree)} drafts in a batch of at most {width}")
        for i, parent in enumerate(tree):
            if not -1 <= parent < i:
                raise ValueError(f"draft {i} has parent {parent}: must be -1 or an earlier draft")
        index.append([parent + 1 for parent in tree] + [0] * (width - len(tree)))
    parent_rows = to_device(index, draft_tokens.device, torch.int64).reshape(batch, width)
    return parent_rows, _valid(draft_tokens, [len(tree) for tree in parents])


def _tree_state(draft_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K + 1] bool per node (the root, then each draft): whether it is on the accepted path (the
    root is), and whether one of its children has been accepted."""
    batch, width = draft_tokens.shape
    on_path = torch.zeros(batch, width + 1, dtype=torch.bool, device=draft_tokens.device)
    on_path[:, 0] = True
    return on_path, torch.zeros_like(on_path)


def _reached(on_path: torch.Tensor, taken: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """[B, 1]: whether a draft with parent row parent [B, 1] is tried: its parent is on the path and
    no earlier sibling has been accepted."""
    return on_path.gather(1, parent) & ~taken.gather(1, parent)


def _accept(on_path, taken, parent, draft: int, accepted: torch.Tensor) -> None:
    """Records whether draft (its parent row parent [B, 1]) was accepted ([B, 1])."""
    on_path[:, draft + 1 : draft + 2] = accepted
    taken.scatter_(1, parent, taken.gather(1, parent) | accepted)


def _tree_rows(on_path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The accepted path ([B, K + 1] bool per node) as rows [B, K + 1] (0, then the accepted drafts'
    rows in depth order, then -1) and num_accepted [B]. A draft's parent precedes it, so the path's
    drafts in index order are in depth order."""
    batch, nodes = on_path.shape
    accepted = on_path[:, 1:]
    num_accepted = accepted.sum(dim=1)
    # Accepted draft i goes to position (accepted drafts up to i), the others to a spare column.
    positions = torch.where(accepted, accepted.cumsum(dim=1), nodes)
    rows = torch.full((batch, nodes + 1), -1, dtype=torch.int64, device=on_path.device)
    rows[:, 0] = 0
    draft_rows = torch.arange(1, nodes, device=on_path.device).expand(batch, -1)
    rows.scatter_(1, positions, draft_rows)
    return rows[:, :nodes].contiguous(), num_accepted


def _tree_tokens(draft_tokens, rows, num_accepted, final) -> torch.Tensor:
    """[B, K + 1]: the accepted drafts' tokens (row r emits draft r - 1), then final [B], then -1."""
    width = rows.shape[1]
    path = draft_tokens.gather(1, (rows[:, 1:] - 1).clamp(min=0))
    positions = torch.arange(width, device=rows.device)
    padded = torch.cat([path, final[:, None]], dim=1)
    tokens = torch.where(positions[None, :] < num_accepted[:, None], padded, -1)
    tokens.scatter_(1, num_accepted[:, None], final[:, None])
    return tokens


def _valid(draft_tokens: torch.Tensor, num_drafts: list[int]) -> torch.Tensor:
    """[B, K]: whether each draft position is within its request's draft."""
    lengths = to_device(num_drafts, draft_tokens.device)
    positions = torch.arange(draft_tokens.shape[1], device=draft_tokens.device)
    return positions[None, :] < lengths[:, None]


def _leading_true(flags: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B] int64: how many of each row's first entries are all True."""
    return flags.to(torch.int64).cumprod(dim=1).sum(dim=1)


def _draws(batch, drafts, vocab, num_drafts, generators, default_generator, dtype, device):
    """The acceptance uniforms [B, K] and the final token's exponentials [B, V]."""
    uniforms = torch.empty(batch, drafts, dtype=dtype, device=device).uniform_(
        generator=default_generator
    )
    noise = torch.empty(batch, vocab, dtype=dtype, device=device).exponential_(
        generator=default_generator
    )
    for row, gen in enumerate(generators or ()):
        if gen is not None:
            uniforms[row, : num_drafts[row]].uniform_(generator=gen)
            noise[row].exponential_(generator=gen)
    return uniforms, noise
