"""Sampling options applied to the float32 logits before sample(): penalties, logit_bias, min_new_tokens
and the per-step allowed-token bitmask.

Per row, in this order: the repetition penalty (HF/CTRL, over prompt and generated tokens: a positive
logit is divided by it, another multiplied), the frequency and presence penalties (OpenAI, over generated
tokens: logit -= frequency * count + presence * (count > 0)), logit_bias (added), the min_new_tokens mask
(EOS ids unless ignore_eos, and stop_token_ids, get -inf until min_new_tokens tokens were generated) and
the bitmask (disallowed tokens get -inf). Rows whose request uses none of these are left untouched, and a
step in which no request uses any does no tensor work.

sample() computes logprobs from the processed logits, so they describe the distribution the token was
drawn from (before temperature, top-k, top-p and min-p); a forbidden token reports sampling.MIN_LOGPROB.

Retraction: the scheduler drops a retracted request and later re-sends it as a new request whose prompt
includes the tokens it had generated. Its generated-token counts then restart from zero, so the frequency
and presence penalties forget the earlier tokens; the repetition penalty still sees them, as prompt tokens.
(min_new_tokens still counts them: the re-sent request says how many it had generated, generated_tokens.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from radixserve.executor.host_copy import to_device
from radixserve.executor.penalty_table import PenaltyTable
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import NewRequest, StepInput

if TYPE_CHECKING:
    from radixserve.executor.request_state import RequestState

BITS_PER_WORD = 32


@dataclass
class LogitsState:
    """What a request using these options carries between steps (RequestState.logits_state)."""

    sampling: SamplingParams
    bias_ids: list[int]
    bias_values: list[float]
    min_tokens_blocked: list[int]  # ids held back until min_new_tokens tokens were generated
    min_new_tokens: int = 0
    penalty_row: int = -1  # its PenaltyTable row; -1: no penalties
    num_generated: int = 0  # output tokens so far, those generated before a retraction included


def uses_penalties(p: SamplingParams) -> bool:
    return p.frequency_penalty != 0 or p.presence_penalty != 0 or p.repetition_active


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    in_prompt: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """Penalised copy of logits [R, V]; counts [R, V] of generated tokens, the per-row factors [R]."""
    generated = counts > 0
    seen = generated | in_prompt
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - (frequency[:, None] * counts + presence[:, None] * generated)


def bitmask_words(masks: list[bytes], vocab_size: int) -> torch.Tensor:
    """int32 [len(masks), ceil(vocab_size / 32)]: each mask's words, zero-padded (disallowed) or cut to fit."""
    width = -(-vocab_size // BITS_PER_WORD)
    words = np.zeros((len(masks), width), dtype=np.int32)
    for row, mask in enumerate(masks):
        row_words = np.frombuffer(mask, dtype="<i4")[:width]
        words[row, : len(row_words)] = row_words
    return torch.from_numpy(words)


def apply_bitmask_(logits: torch.Tensor, words: torch.Tensor) -> None:
    """Set logits [R, V] to -inf where the bit of words [R, ceil(V / 32)] (xgrammar's layout) is 0."""
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=words.device)
    allowed = ((words[:, :, None] >> shifts) & 1).view(words.shape[0], -1)[:, : logits.shape[1]]
    logits.masked_fill_(allowed == 0, float("-inf"))


def _acts_this_step(ls: LogitsState | None) -> bool:
    return ls is not None and (
        ls.penalty_row >= 0 or bool(ls.bias_ids) or ls.num_generated < ls.min_new_tokens
    )


class LogitsProcessor:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], device: torch.device):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        self.penalties = PenaltyTable(vocab_size, device)
        self.num_active = 0  # requests holding a LogitsState

    def register(self, state: RequestState, req: NewRequest) -> None:
        """Give a new request a LogitsState when its sampling options need one."""
        p = req.sampling
        in_vocab = range(self.vocab_size)
        bias = {t: b for t, b in p.logit_bias.items() if t in in_vocab and b != 0}
        stop = req.stopping
        blocked = []
        if stop.min_new_tokens > req.generated_tokens:
            stops = [*stop.stop_token_ids, *([] if stop.ignore_eos else self.eos_token_ids)]
            blocked = sorted({t for t in stops if t in in_vocab})
        if not (bias or blocked or uses_penalties(p)):
            return
        ls = LogitsState(
            p,
            list(bias),
            list(bias.values()),
            blocked,
            stop.min_new_tokens,
            num_generated=req.generated_tokens,
        )
        if uses_penalties(p):
            prompt = (req.penalty_prompt_ids or req.input_ids) if p.repetition_active else []
            ls.penalty_row = self.penalties.assign(prompt)
        state.logits_state = ls
        self.num_active += 1

    def release(self, state: RequestState) -> None:
        ls = state.logits_state
        if ls is None:
            return
        if ls.penalty_row >= 0:
            self.penalties.release(ls.penalty_row)
        state.logits_state = None
        self.num_active -= 1

    def reset(self) -> None:
        self.penalties = PenaltyTable(self.vocab_size, self.device)
        self.num_active = 0

    def apply(
        self, logits: torch.Tensor, states: list[RequestState], bitmasks: list[bytes] | None
    ) -> None:
        """Process, in place, the rows of logits [len(states), V] whose request uses an option."""
        if not self.num_active and bitmasks is None:
            return
        masks = bitmasks or [b""] * len(states)
        rows = [
            i for i, (s, m) in enumerate(zip(states, masks)) if m or _acts_this_step(s.logits_state)
        ]
        if not rows:
            return
        row_index = to_device(rows, logits.device)
        sub = logits.index_select(0, row_index)
        picked = [states[i].logits_state for i in rows]
        self._penalise(sub, picked)
        self._bias_and_block(sub, picked)
        masked = [j for j, i in enumerate(rows) if masks[i]]
        if masked:
            index = to_device(masked, logits.device)
            part = sub.index_select(0, index)
            apply_bitmask_(
                part,
                bitmask_words([masks[rows[j]] for j in masked], part.shape[1]).to(logits.device),
            )
            sub.index_copy_(0, index, part)
        logits.index_copy_(0, row_index, sub)

    def record(self, states: list[RequestState], tokens: torch.Tensor) -> None:
        """Account for the tokens just sampled: tokens[i] (a device tensor, not read back) for states[i]."""
        if not self.num_active:
            return
        rows, positions = [], []
        for i, state in enumerate(states):
            ls = state.logits_state
            if ls is not None:
                ls.num_generated += 1
                if ls.penalty_row >= 0:
                    rows.append(ls.penalty_row)
                    positions.append(i)
        if rows:
            self.penalties.count(rows, tokens.index_select(0, to_device(positions, tokens.device)))

    def _penalise(self, sub: torch.Tensor, picked: list[LogitsState | None]) -> None:
        rows = [j for j, ls in enumerate(picked) if ls is not None and ls.penalty_row >= 0]
        if not rows:
            return
        device = sub.device
        params = [picked[j].sampling for j in rows]
        table_rows = to_device([picked[j].penalty_row for j in rows], device)
        factors = to_device(
            [
                [p.frequency_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.repetition_penalty if p.repetition_active else 1.0 for p in params],
            ],
            device,
            sub.dtype,
        )
        index = to_device(rows, device)
        penalised = apply_penalties(
            sub.index_select(0, index),
            self.penalties.counts.index_select(0, table_rows),
            self.penalties.in_prompt.index_select(0, table_rows),
            *factors,
        )
        sub.index_copy_(0, index, penalised)

    @staticmethod
    def _bias_and_block(sub: torch.Tensor, picked: list[LogitsState | None]) -> None:
        bias_rows, bias_ids, bias_values, block_rows, block_ids = [], [], [], [], []
        for j, ls in enumerate(picked):
            if ls is None:
                continue
            if ls.bias_ids:
                bias_rows += [j] * len(ls.bias_ids)
                bias_ids += ls.bias_ids
                bias_values += ls.bias_values
            if ls.min_tokens_blocked and ls.num_generated < ls.min_new_tokens:
                block_rows += [j] * len(ls.min_tokens_blocked)
                block_ids += ls.min_tokens_blocked
        device = sub.device
        if bias_rows:
            index = to_device([bias_rows, bias_ids], device)
            values = to_device(bias_values, device, sub.dtype)
            sub.index_put_((index[0], index[1]), values, accumulate=True)
        if block_rows:
            index = to_device([block_rows, block_ids], device)
            sub[index[0], index[1]] = float("-inf")


def step_bitmasks(step: StepInput, sample_request_ids: list[str]) -> list[bytes] | None:
    """Each sampling row's token_bitmask (b"": none), or None when the step carries no bitmask at all."""
    given = {
        r.request_id: r.token_bitmask
        for r in (*step.new_requests, *step.continuing_requests)
        if r.token_bitmask
    }
    if not given:
        return None
    return [given.get(rid, b"") for rid in sample_request_ids]
