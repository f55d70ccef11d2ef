"""Token statistics of the requests that use penalties, one row per request, on the logits' device.

Keeping them in shared [rows, vocab] tensors lets a step gather every penalised row with one
index_select and count the sampled tokens with one indexed add, whatever the batch size.
"""

from __future__ import annotations

import torch

from radixserve.executor.host_copy import to_device

MIN_ROWS = 8


class PenaltyTable:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        # counts[r, t]: how many times row r's request generated token t (float32: used in logit arithmetic).
        self.counts = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)
        # in_prompt[r, t]: token t occurs in row r's prompt.
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.free: list[int] = []
        self.one = torch.ones((), device=device)  # count()'s increment, made once

    def assign(self, prompt_ids: list[int]) -> int:
        """A cleared row for a new request, with its prompt tokens marked (ids outside the vocab ignored)."""
        if not self.free:
            self._grow()
        row = self.free.pop()
        self.counts[row].zero_()
        self.in_prompt[row].zero_()
        ids = [t for t in prompt_ids if 0 <= t < self.vocab_size]
        if ids:
            self.in_prompt[row, to_device(ids, self.device)] = True
        return row

    def release(self, row: int) -> None:
        self.free.append(row)

    def count(self, rows: list[int], token_ids: torch.Tensor) -> None:
        """Add one generated occurrence of token_ids[i] (a device tensor) to rows[i] (rows are distinct)."""
        index = to_device(rows, self.device)
        self.counts.index_put_((index, token_ids.to(self.device)), self.one, accumulate=True)

    def _grow(self) -> None:
        old = self.counts.shape[0]
        extra = max(MIN_ROWS, old)
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra, self.vocab_size)])
        self.in_prompt = torch.cat(
            [self.in_prompt, self.in_prompt.new_zeros(extra, self.vocab_size)]
        )
        self.free += reversed(range(old, old + extra))
