"""Mean negative log-likelihood of a fixed text (tests/data/nll_text.txt) under a ModelRunner, for
comparing one model under different storage (an fp8 KV cache, quantized weights) with its bf16 self.

The text runs as a short first prefill, then chunks that each extend over the cached prefix, with the
prompt logprobs of every position: most predictions attend over K/V read back from the pool (the first
chunk attends over its own fresh K/V), at a few steps for the whole text."""

from __future__ import annotations

import pathlib

from radixserve.common.step import ContinuingRequest, NewRequest, PromptLogprobRange, StepInput

TEXT = (pathlib.Path(__file__).parents[1] / "data" / "nll_text.txt").read_text()


def mean_nll(runner, ids: list[int], first: int = 8, chunk: int = 32, rid: str = "nll") -> float:
    """Mean over ids[1:] of -log p(ids[i] | ids[:i]); ids must fit the runner's KV slots."""
    assert 2 <= len(ids) < runner.kv_slots - 1
    logprobs: list[float] = []
    start, step_id = 0, 0
    while start < len(ids) - 1:
        end = min(start + (first if start == 0 else chunk), len(ids))
        part = ids[start:end]
        after = ids[end] if end < len(ids) else -1
        wanted = PromptLogprobRange(0, len(part) if after >= 0 else len(part) - 1, after)
        slots = list(range(start + 1, end + 1))  # slot 0 is the padding sink
        step_id += 1
        if start == 0:
            req = NewRequest(rid, part, slots, sample=False, prompt_logprobs=wanted)
            step = StepInput(step_id, new_requests=[req])
        else:
            req = ContinuingRequest(rid, slots, part, sample=False, prompt_logprobs=wanted)
            step = StepInput(step_id, continuing_requests=[req])
        (got,) = runner.step(step).prompt_logprobs
        logprobs += [lp.logprob for lp in got.logprobs]
        start = end
    runner.step(StepInput(step_id + 1, finished_request_ids=[rid]))
    assert len(logprobs) == len(ids) - 1
    return -sum(logprobs) / len(logprobs)
