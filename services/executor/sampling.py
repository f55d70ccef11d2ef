"""Token sampling, vectorised over the batch.

Sampling draws by the exponential race: token = argmax(p / E) with E ~ Exp(1) i.i.d. per vocab
entry, which picks token i with probability p_i. Each seeded request draws its row of E from its
own torch.Generator, so its tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.executor.host_copy import to_device, to_host
from radixserve.common.sampling import SamplingParams

MIN_LOGPROB = -9999.0


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]]]
    token_ids_logprobs: list[list[tuple[int, float]]]  # per row: sampling.token_ids_logprob's


def _filter_probs(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Zero the entries top_k / top_p / min_p exclude (rows need not sum to 1 afterwards)."""
    vocab = probs.shape[1]
    device = probs.device
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p if 0 < p.top_p < 1 else 1.0 for p in params]
    min_p = [p.min_p if p.min_p > 0 else 0.0 for p in params]
    if any(k < vocab for k in top_k) or any(p < 1 for p in top_p):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device)
        drop = ranks[None, :] >= to_device(top_k, device)[:, None]
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # The most likely token is always kept: its mass_before is 0.
        drop |= mass_before >= to_device(top_p, device, probs.dtype)[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.empty_like(probs).scatter_(1, order, sorted_probs)
    if any(m > 0 for m in min_p):
        threshold = to_device(min_p, device, probs.dtype)[:, None] * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


@dataclass
class DeviceSample:
    """A step's sampled tokens (and asked-for logprobs) still on the logits' device; to_host() starts
    their copy to the host without waiting, result() reads it (after the device has finished)."""

    tokens: torch.Tensor  # int64 [S]
    logprob_rows: list[int]  # rows that asked for logprobs
    top_nums: list[int]  # top_logprobs_num of each such row
    chosen: torch.Tensor | None = None  # [len(logprob_rows)] logprob of each row's token
    top_values: torch.Tensor | None = None  # [len(logprob_rows), max top_nums]
    top_ids: torch.Tensor | None = None
    asked_ids: list[tuple[int, ...]] | None = None  # token_ids_logprob of each logprob row
    asked_values: torch.Tensor | None = None  # [len(logprob_rows), max len(asked_ids)]

    def to_host(self) -> "DeviceSample":
        """Copies of the tensors in pinned host memory, made asynchronously on the current stream."""
        return DeviceSample(
            to_host(self.tokens),
            self.logprob_rows,
            self.top_nums,
            to_host(self.chosen),
            to_host(self.top_values),
            to_host(self.top_ids),
            self.asked_ids,
            to_host(self.asked_values),
        )

    def result(self) -> SampleResult:
        token_ids = self.tokens.tolist()
        logprobs: list[float | None] = [None] * len(token_ids)
        tops: list[list[tuple[int, float]]] = [[] for _ in token_ids]
        asked: list[list[tuple[int, float]]] = [[] for _ in token_ids]
        if self.logprob_rows:
            chosen = self.chosen.tolist()
            top_values = self.top_values.tolist() if self.top_values is not None else None
            top_ids = self.top_ids.tolist() if self.top_ids is not None else None
            asked_values = self.asked_values.tolist() if self.asked_values is not None else None
            for j, (i, n) in enumerate(zip(self.logprob_rows, self.top_nums)):
                logprobs[i] = chosen[j]
                if n > 0:
                    tops[i] = list(zip(top_ids[j][:n], top_values[j][:n]))
                if asked_values is not None and self.asked_ids[j]:
                    asked[i] = list(zip(self.asked_ids[j], asked_values[j]))
        return SampleResult(token_ids, logprobs, tops, asked)


def sample_on_device(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator | None = None,
) -> DeviceSample:
    """Pick one token per row of float32 logits [S, vocab]; generators[i] is row i's seeded generator.
    Nothing waits for the device: the tokens stay there (see DeviceSample)."""
    greedy = [is_greedy(p) for p in params]
    tokens = logits.argmax(dim=-1)
    if not all(greedy):
        probs = sampling_probs(logits, params, greedy)
        noise = torch.empty_like(probs).exponential_(generator=default_generator)
        for row, gen in enumerate(generators):
            if gen is not None and not greedy[row]:
                noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(to_device(greedy, logits.device), tokens, sampled)
    return with_logprobs(logits, tokens, params)


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature <= 0 or params.top_k == 1


def sampling_probs(
    logits: torch.Tensor, params: list[SamplingParams], greedy: list[bool]
) -> torch.Tensor:
    """The distributions rows are sampled from: softmax at the row's temperature, then top-k /
    top-p / min-p (rows need not sum to 1); greedy rows are left at temperature 1, unfiltered."""
    temps = to_device(
        [1.0 if g else p.temperature for g, p in zip(greedy, params)], logits.device, logits.dtype
    )
    return _filter_probs(torch.softmax(logits / temps[:, None], dim=-1), params)


def with_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]
) -> DeviceSample:
    """The DeviceSample of tokens [S] picked from logits [S, vocab], with the logprobs the rows whose
    params ask for them want (computed on the device, not read back)."""
    rows = [i for i, p in enumerate(params) if p.return_logprob]
    out = DeviceSample(tokens, rows, [params[i].top_logprobs_num for i in rows])
    if rows:
        row_index = to_device(rows, logits.device)
        # Floored like OpenAI's: a token a logits processor forbade (-inf) reports MIN_LOGPROB.
        log_probs = torch.log_softmax(logits.index_select(0, row_index), dim=-1).clamp_(
            min=MIN_LOGPROB
        )
        out.chosen = log_probs.gather(1, tokens.index_select(0, row_index)[:, None]).squeeze(1)
        n_top = min(max(out.top_nums), log_probs.shape[1])
        if n_top > 0:
            out.top_values, out.top_ids = log_probs.topk(n_top, dim=-1)
        out.asked_ids = [params[i].token_ids_logprob for i in rows]
        width = max(len(ids) for ids in out.asked_ids)
        if width:
            # Rows asking for fewer ids are padded with id 0; result() reads only their own.
            padded = [list(ids) + [0] * (width - len(ids)) for ids in out.asked_ids]
            out.asked_values = log_probs.gather(1, to_device(padded, logits.device, torch.int64))
    return out


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator | None = None,
) -> SampleResult:
    """sample_on_device, read back at once."""
    return sample_on_device(logits, params, generators, default_generator).result()
