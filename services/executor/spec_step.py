"""The sampling half of a verify step (speculative decoding, docs/speculative.md): from the logits
at every token of the step's requests to their verified tokens, the next decode inputs and the
logprobs of every emitted token. spec_verify.py decides acceptance; this file lays the rows out,
builds each row's distribution as sampling.py does, and reads the result back.

Logits rows come request after request: a request with n drafts has n + 1 rows (after its last
verified token, then after each draft token), one without drafts a single row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.executor.host_copy import to_device
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import SampledToken, token_logprob
from radixserve.executor.sampling import DeviceSample, is_greedy, sampling_probs, with_logprobs
from radixserve.executor.spec_verify import (
    DeviceVerify,
    merge_greedy,
    pad_positions,
    verify_greedy,
    verify_sampling,
    verify_tree_greedy,
    verify_tree_sampling,
)


@dataclass
class DeviceSpecSample:
    """A verify step's result, on the device until to_host(): the verified tokens [B, K + 1] and,
    per logits row, the token emitted there (0 past the request's accepted ones) with its
    logprobs."""

    verified: DeviceVerify
    per_row: DeviceSample
    starts: list[int]  # each request's first row

    def to_host(self) -> "DeviceSpecSample":
        return DeviceSpecSample(self.verified.to_host(), self.per_row.to_host(), self.starts)

    def outputs(self, request_ids: list[str]) -> list[SampledToken]:
        verified, rows = self.verified.result(), self.per_row.result()
        outputs = []
        for i, rid in enumerate(request_ids):
            tokens, a = verified.token_ids[i], verified.num_accepted[i]
            # The logits row of each emitted token: the j-th of a chain, a tree's path.
            at = [self.starts[i] + r for r in (verified.rows[i] if verified.rows else range(a + 1))]
            last = at[a]
            drafts_logprobs = [
                token_logprob(
                    tokens[j],
                    rows.logprobs[at[j]],
                    rows.top_logprobs[at[j]],
                    requested=rows.token_ids_logprobs[at[j]],
                )
                for j in range(a)
                if rows.logprobs[at[j]] is not None
            ]
            outputs.append(
                SampledToken(
                    rid,
                    tokens[a],
                    rows.logprobs[last],
                    rows.top_logprobs[last],
                    rows.token_ids_logprobs[last],
                    tokens[:a],
                    drafts_logprobs,
                )
            )
        return outputs


def verify_on_device(
    logits: torch.Tensor,
    num_drafts: list[int],
    draft_ids: list[list[int]],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator | None = None,
    parents: list[list[int]] | None = None,
) -> DeviceSpecSample:
    """Verify each request's drafts against float32 logits [sum(n_i + 1), V]: greedy requests by
    argmax (exact), sampled ones by rejection sampling on their temperature / top-k / top-p / min-p
    distribution. generators[i]: request i's seeded generator (seeded for its first position)."""
    device = logits.device
    width = max(num_drafts) + 1
    starts, start = [], 0
    for n in num_drafts:
        starts.append(start)
        start += n + 1
    drafts = to_device(
        [list(d) + [-1] * (width - 1 - len(d)) for d in draft_ids], device, torch.int64
    )
    greedy = [is_greedy(p) for p in params]
    row_params = [p for p, n in zip(params, num_drafts) for _ in range(n + 1)]
    if parents:  # a step with tree drafts: every request verified as a tree (a chain is one)
        trees = [p or list(range(-1, n - 1)) for p, n in zip(parents, num_drafts)]
        exact = verify_tree_greedy(pad_positions(logits, num_drafts), drafts, trees)
    else:
        exact = verify_greedy(pad_positions(logits, num_drafts), drafts, num_drafts)
    verified = exact
    if not all(greedy):
        row_greedy = [is_greedy(p) for p in row_params]
        probs = pad_positions(sampling_probs(logits, row_params, row_greedy), num_drafts)
        gens = [None if g else gen for g, gen in zip(greedy, generators)]
        if parents:
            sampled = verify_tree_sampling(
                probs, drafts, trees, generators=gens, default_generator=default_generator
            )
        else:
            sampled = verify_sampling(
                probs, drafts, num_drafts, generators=gens, default_generator=default_generator
            )
        verified = merge_greedy(greedy, exact, sampled)
    return DeviceSpecSample(
        verified, with_logprobs(logits, _row_tokens(verified, num_drafts), row_params), starts
    )


def _row_tokens(verified: DeviceVerify, num_drafts: list[int]) -> torch.Tensor:
    """Each logits row's emitted token (for its logprob; 0 at rows that emit none): a chain's j-th
    token at its row j, a tree's at the row its path names."""
    device = verified.tokens.device
    starts = [0]
    for n in num_drafts:
        starts.append(starts[-1] + n + 1)
    total = starts.pop()
    if verified.rows is None:
        req_of_row = [i for i, n in enumerate(num_drafts) for _ in range(n + 1)]
        pos_of_row = [j for n in num_drafts for j in range(n + 1)]
        index = to_device([req_of_row, pos_of_row], device, torch.int64)
        return verified.tokens[index[0], index[1]].clamp(min=0)
    width = verified.tokens.shape[1]
    emitted = torch.arange(width, device=device)[None, :] <= verified.num_accepted[:, None]
    # Tokens past the accepted ones all go to one extra row, dropped after.
    at = torch.where(
        emitted, to_device(starts, device, torch.int64)[:, None] + verified.rows, total
    )
    out = torch.zeros(total + 1, dtype=torch.int64, device=device)
    out.scatter_(0, at.reshape(-1), verified.tokens.clamp(min=0).reshape(-1))
    return out[:total]


def next_tokens(verified: DeviceVerify) -> torch.Tensor:
    """[B]: each request's last emitted token (the next decode's input)."""
    return verified.tokens.gather(1, verified.num_accepted[:, None]).squeeze(1)
