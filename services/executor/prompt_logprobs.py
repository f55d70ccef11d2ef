"""Prompt logprobs: the log-probability of each asked-for prompt token under the model's distribution
at the position before it (no temperature, penalties, bias or grammar: the raw log-softmax).

The model computes logits only where a request samples; here the hidden states of the asked-for
positions go through the LM head a bounded group of positions at a time, so a long prompt never holds
positions x vocab floats at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from radixserve.executor.host_copy import to_device
from radixserve.common.step import PromptLogprobs, token_logprob

# Most logits floats one group of positions may hold (64 MiB of float32).
MAX_LOGITS_ELEMENTS = 1 << 24


@dataclass
class PromptLogprobRows:
    """One request's positions in the step's flattened batch and the prompt token after each."""

    request_id: str
    first_index: int  # batch index of the first position; the positions are consecutive
    targets: list[int]
    top_logprobs_num: int


@dataclass
class DevicePromptLogprobs:
    """One request's prompt logprobs, still on the device until read()."""

    rows: PromptLogprobRows
    chosen: torch.Tensor  # [positions] logprob of each target
    ranks: torch.Tensor  # [positions] its rank (1: the most likely)
    top_values: torch.Tensor | None  # [positions, top_logprobs_num]
    top_ids: torch.Tensor | None

    def read(self) -> PromptLogprobs:
        chosen, ranks = self.chosen.tolist(), self.ranks.tolist()
        k = self.rows.top_logprobs_num
        values = self.top_values.tolist() if k else [[]] * len(chosen)
        ids = self.top_ids.tolist() if k else [[]] * len(chosen)
        return PromptLogprobs(
            self.rows.request_id,
            [
                token_logprob(t, lp, list(zip(i, v)), rank)
                for t, lp, rank, i, v in zip(self.rows.targets, chosen, ranks, ids, values)
            ],
        )


def positions_per_group(vocab_size: int) -> int:
    return max(1, MAX_LOGITS_ELEMENTS // max(1, vocab_size))


def compute_prompt_logprobs(
    hidden: torch.Tensor,
    requests: list[PromptLogprobRows],
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int,
) -> list[DevicePromptLogprobs]:
    """The logprobs of each request's targets from hidden [num_tokens, hidden] (the final-normed
    states the LM head reads), group by group of positions_per_group(vocab_size) positions."""
    group = positions_per_group(vocab_size)
    device = hidden.device
    results = []
    for req in requests:
        n, k = len(req.targets), req.top_logprobs_num
        targets = to_device(req.targets, device, torch.int64)
        chosen, ranks, top_values, top_ids = [], [], [], []
        for lo in range(0, n, group):
            hi = min(n, lo + group)
            log_probs = torch.log_softmax(
                compute_logits(hidden[req.first_index + lo : req.first_index + hi]), dim=-1
            )
            picked = log_probs.gather(1, targets[lo:hi, None])
            chosen.append(picked.squeeze(1))
            ranks.append((log_probs > picked).sum(dim=-1) + 1)
            if k:
                values, ids = log_probs.topk(min(k, log_probs.shape[1]), dim=-1)
                top_values.append(values)
                top_ids.append(ids)
        results.append(
            DevicePromptLogprobs(
                req,
                torch.cat(chosen),
                torch.cat(ranks),
                torch.cat(top_values) if k else None,
                torch.cat(top_ids) if k else None,
            )
        )
    return results
