"""What the executor remembers about a request between steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.executor.logits_processors import LogitsState
from radixserve.common.sampling import SamplingParams


@dataclass
class RequestState:
    table_row: (
        int  # this request's row of the executor's SlotTable: its KV slots and last sampled token
    )
    length: int  # tokens with KV: the row's first `length` slots
    sampling: SamplingParams
    generator: torch.Generator | None
    # A token was sampled for it (in a step launched, perhaps not finished yet): the next decode's input,
    # kept in SlotTable.next_tokens.
    has_token: bool = False
    logits_state: LogitsState | None = (
        None  # set when its sampling options need history (LogitsProcessor)
    )
    lora_name: str = ""  # its LoRA adapter ("": the base model)
    # A verify step of its drafts is launched and not collected: length counts every draft until
    # collect() takes the rejected ones back.
    verifying: bool = False
    # EAGLE (eagle_step.py): the last position of a prefill chunk that did not sample, waiting for the
    # next chunk's first token to run the draft head: (its hidden row [1, width], its slot).
    draft_pending: tuple[torch.Tensor, int] | None = None

    @classmethod
    def create(
        cls, table_row: int, prefix_len: int, sampling: SamplingParams, device: torch.device
    ) -> "RequestState":
        generator = torch.Generator(device=device) if sampling.seed is not None else None
        return cls(table_row, prefix_len, sampling, generator)

    def generator_for_next_token(self, length: int | None = None) -> torch.Generator | None:
        """The seeded generator, reseeded from (seed, position of the token being sampled).

        Seeding by position rather than advancing one stream keeps a seeded request's tokens the
        same when it is retracted and re-prefilled, and whichever requests share its batch. length:
        the position to seed from instead of the request's length (a verify step's first token).
        """
        if self.generator is None:
            return None
        return self.generator.manual_seed(
            hash((self.sampling.seed, self.length if length is None else length))
            & 0x7FFF_FFFF_FFFF_FFFF
        )
