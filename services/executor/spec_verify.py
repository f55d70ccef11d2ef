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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from radixserve.executor.host_copy import to_device, to_host


@dataclass
class VerifyResult:
    token_ids: list[list[int]]  # per request: its accepted draft tokens, then the target's token
    num_accepted: list[int]  # draft tokens accepted per request: len(token_ids[i]) - 1


@dataclass
class DeviceVerify:
    """A step's verified tokens, still on the device: tokens [B, K + 1] holds each request's
    num_accepted + 1 tokens, then -1."""

    tokens: torch.Tensor
    num_accepted: torch.Tensor  # int64 [B]

    def to_host(self) -> "DeviceVerify":
        """Copies in pinned host memory, made asynchronously on the current stream."""
        return DeviceVerify(to_host(self.tokens), to_host(self.num_accepted))

    def result(self) -> VerifyResult:
        accepted = self.num_accepted.tolist()
        rows = self.tokens.tolist()
        return VerifyResult([row[: a + 1] for row, a in zip(rows, accepted)], accepted)


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
    exact = verify_greedy(target_probs, draft_tokens, num_drafts)
    rows = to_device(greedy, target_probs.device)
    return DeviceVerify(
        torch.where(rows[:, None], exact.tokens, sampled.tokens),
        torch.where(rows, exact.num_accepted, sampled.num_accepted),
    )


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
