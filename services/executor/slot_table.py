"""The request-to-slot table attention reads, on every device: one row per active request, holding its
KV slot ids in position order (SGLang's req_to_token). It is the executor's only copy of the slot
lists. The scheduler still decides every slot id; this table only mirrors the slot lists the steps
carry, on the device, so that kernels (and CUDA graphs) find them without a per-step gather. Rows
are handed to requests as they arrive and taken back when they finish.

Past the requests' rows, spare rows (common/draft_tree.spare_rows) give each node of a tree
draft its own view of its sequence (the request's prefix, then the node's ancestors) for one verify
step; every step that has tree drafts writes them again, and the device runs steps in order, so a
step never reads another step's spare rows.

Each row also keeps, on the device, the token last sampled for its request (next_tokens): a decode
step takes its input from there, so it can be launched before the previous step's tokens reach the
host.
"""

from __future__ import annotations

import torch


class SlotTable:
    def __init__(self, rows: int, width: int, device: torch.device, spare_rows: int = 0):
        self.width = width
        self.rows = rows  # the requests' rows; the spare ones follow
        self.spare_rows = spare_rows
        self.tensor = torch.zeros(rows + spare_rows, width, dtype=torch.int64, device=device)
        self.next_tokens = torch.zeros(rows + spare_rows, dtype=torch.int64, device=device)
        self.reset()

    def spare(self, i: int) -> int:
        """The i-th spare row (0 <= i < spare_rows)."""
        assert 0 <= i < self.spare_rows, (i, self.spare_rows)
        return self.rows + i

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def assign(self) -> int:
        return self._free.pop()

    def release(self, row: int) -> None:
        if row >= 0:
            self._free.append(row)

    def reset(self) -> None:
        """Every row free (popped from the end: row 0 first)."""
        self._free = list(range(self.rows - 1, -1, -1))

    def write(self, rows: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor) -> None:
        """table[rows[i], cols[i]] = slots[i] (device int64 tensors of one length)."""
        if rows.numel():
            self.tensor.index_put_((rows, cols), slots)
