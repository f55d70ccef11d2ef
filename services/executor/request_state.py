"""What the executor remembers about a request between steps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.executor.logits_processors import LogitsState
from radixserve.common.sampling import SamplingParams


@dataclass
class RequestState:
    # Host int64 buffer; slots[:length] are the request's KV slots in position order. Kept on the
    # host: per-token device writes would cost a launch each. None with a SlotTable (GPU backends):
    # the device table is then the only copy.
    slots: torch.Tensor | None
    length: int
    sampling: SamplingParams
    generator: torch.Generator | None
    # A token was sampled for it (in a step launched, perhaps not finished yet): the next decode's input.
    has_token: bool = False
    # That token on the host; only without a SlotTable (with one, SlotTable.next_tokens holds it on the device).
    last_token: int | None = None
    table_row: int = -1  # this request's row of the executor's SlotTable (GPU backends), -1: none
    logits_state: LogitsState | None = None  # set when its sampling options need history (LogitsProcessor)

    @classmethod
    def create(cls, prefix_slots: list[int], sampling: SamplingParams, device: torch.device,
               host_slots: bool = True) -> "RequestState":
        slots = None
        if host_slots:
            slots = torch.zeros(max(64, 2 * len(prefix_slots)), dtype=torch.int64)
            if prefix_slots:
                slots[:len(prefix_slots)] = torch.tensor(prefix_slots, dtype=torch.int64)
        generator = torch.Generator(device=device) if sampling.seed is not None else None
        return cls(slots, len(prefix_slots), sampling, generator)

    def generator_for_next_token(self) -> torch.Generator | None:
        """The seeded generator, reseeded from (seed, position of the token being sampled).

        Seeding by position rather than advancing one stream keeps a seeded request's tokens the
        same when it is retracted and re-prefilled, and whichever requests share its batch.
        """
        if self.generator is None:
            return None
        return self.generator.manual_seed(hash((self.sampling.seed, self.length)) & 0x7FFF_FFFF_FFFF_FFFF)

    def append_slots(self, new_slots: list[int]) -> torch.Tensor:
        """Add slots after the current ones; returns the full slot list as a view."""
        end = self.length + len(new_slots)
        if end > self.slots.numel():
            grown = torch.zeros(max(end, 2 * self.slots.numel()), dtype=torch.int64)
            grown[:self.length] = self.slots[:self.length]
            self.slots = grown
        if len(new_slots) == 1:
            self.slots[self.length] = new_slots[0]
        else:
            self.slots[self.length:end] = torch.tensor(new_slots, dtype=torch.int64)
        self.length = end
        return self.slots[:end]
