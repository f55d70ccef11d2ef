"""Which prompt positions of a request a prefill step computes logprobs at (sampling.prompt_logprob_start).

Prompt token j's logprob comes from the logits at position j - 1, so a request that wants them from
token s on needs the logits of positions max(s, 1) - 1 .. len(prompt) - 2 (the last prompt position
samples the first output token, whose logprob is the output's). Those positions must run: the prefix
cache may serve only the tokens before the first of them. Each chunk's range is planned once
(Request.prompt_logprob_next moves past it), so a request retracted or re-chunked later does not ask
again for positions already planned.
"""

from __future__ import annotations

from radixserve.common.step import PromptLogprobRange
from radixserve.scheduler.request import Request


def next_wanted_position(req: Request) -> int | None:
    """The first prompt position whose logits a step must still compute; None: none left."""
    sampling = req.sampling
    if not sampling.wants_prompt_logprobs:
        return None
    pos = max(req.prompt_logprob_next, sampling.first_prompt_logprob_token() - 1)
    return pos if pos < len(req.prompt_ids) - 1 else None


def prefix_limit(req: Request, fill_len: int) -> int:
    """How many leading tokens of fill (req.seq) the prefix cache may serve at admission."""
    limit = fill_len - 1  # at least one token must run to sample from
    wanted = next_wanted_position(req)
    return limit if wanted is None else min(limit, wanted)


def plan_range(req: Request, chunk_start: int, n: int) -> PromptLogprobRange | None:
    """The range of a chunk running positions chunk_start .. chunk_start + n - 1; marks it planned."""
    lo = next_wanted_position(req)
    if lo is None:
        return None
    lo = max(lo, chunk_start)
    hi = min(chunk_start + n, len(req.prompt_ids) - 1)
    if lo >= hi:
        return None
    req.prompt_logprob_next = hi
    end = chunk_start + n
    return PromptLogprobRange(
        start=lo - chunk_start,
        count=hi - lo,
        next_token_id=req.prompt_ids[end] if hi == end else -1,
        top_logprobs_num=req.sampling.prompt_top_logprobs_num,
    )
