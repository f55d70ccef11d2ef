"""The request-to-slot table attention reads, on every device: one row per active request, holding its
KV slot ids in position order (SGLang's req_to_token). It is the executor's only copy of the slot
lists. The scheduler still decides every slot id; this table only mirrors the slot lists the steps
carry, on the device, so that kernels (and CUDA graphs) find them without a per-step gather. Rows
are handed to requests as they arrive and taken back when they finish.

Each row also keeps, on the device, the token last sampled for its request (next_tokens): a decode
step takes its input from there, so it can be launched before the previous step's tokens reach the
host.
"""

from __future__ import annotations

import torch


class SlotTable:
    def __init__(self, rows: int, width: int, device: torch.device):
        self.width = width
        self.tensor = torch.zeros(rows, width, dtype=torch.int64, device=device)
        self.next_tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        self.reset()

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
        self._free = list(range(self.tensor.shape[0] - 1, -1, -1))

    def write(self, rows: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor) -> None:
        """table[rows[i], cols[i]] = slots[i] (device int64 tensors of one length)."""
        if rows.numel():
            self.tensor.index_put_((rows, cols), slots)
