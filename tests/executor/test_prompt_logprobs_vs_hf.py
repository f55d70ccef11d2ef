"""Prompt logprobs against transformers on a tiny random Llama (fp32, torch_native on the CPU): the
executor's ranges (whole prompt, split over chunks, computed in small groups of positions) and the
scheduler core driving it (chunked prefill, a prompt whose prefix is in the radix cache).

Tolerance: logprobs agree with HF's log_softmax to atol 1e-4 (fp32; differences come from op order),
top alternatives have the same ids and values.
"""

import pytest
import torch

from radixserve.common.sampling import SamplingParams, StoppingCriteria
from radixserve.common.step import ContinuingRequest, NewRequest, PromptLogprobRange, StepInput
from radixserve.executor import prompt_logprobs
from radixserve.executor.runner import ModelRunner
from radixserve.scheduler.core import Scheduler
from radixserve.scheduler.request import Request
from tests.configs import runner_config, scheduler_config
from tests.executor.hf_parity import ATOL, SlotPool, build_hf_model, prompts

TOP = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf = build_hf_model("llama", folder)
    runner = ModelRunner(
        folder,
        runner_config(
            dtype="float32", device="cpu", max_total_tokens=1024, attention_backend="torch_native"
        ),
    )
    return hf, runner


def hf_prompt_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row j is the log-softmax at position j (prompt token j + 1's)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def assert_matches_hf(hf, prompt, entries, first_token=1):
    expected = hf_prompt_logprobs(hf, prompt)[first_token - 1 :]
    targets = prompt[first_token:]
    assert [e.token_id for e in entries] == targets
    got = torch.tensor([e.logprob for e in entries])
    want = expected.gather(1, torch.tensor(targets)[:, None]).squeeze(1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert [e.rank for e in entries] == ((expected > want[:, None]).sum(-1) + 1).tolist()
    for entry, row in zip(entries, expected):
        values, ids = row.topk(TOP)
        assert [t.token_id for t in entry.top] == ids.tolist()
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in entry.top]), values, atol=ATOL, rtol=0
        )


def test_whole_prompt(models):
    hf, runner = models
    runner.reset()
    pool = SlotPool(runner.kv_slots)
    (p,) = prompts(11, 15)
    rng = PromptLogprobRange(0, len(p) - 1, top_logprobs_num=TOP)
    out = runner.step(
        StepInput(1, new_requests=[NewRequest("a", p, pool.take(len(p)), prompt_logprobs=rng)])
    )
    assert [o.request_id for o in out.prompt_logprobs] == ["a"]
    assert_matches_hf(hf, p, out.prompt_logprobs[0].logprobs)
    assert len(out.outputs) == 1  # the last position still samples


def test_chunks_and_small_groups_of_positions(models, monkeypatch):
    hf, runner = models
    runner.reset()
    monkeypatch.setattr(prompt_logprobs, "MAX_LOGITS_ELEMENTS", 3 * runner.config.vocab_size)
    pool = SlotPool(runner.kv_slots, seed=1)
    p, other = prompts(12, 20, 6)
    # Chunk one: positions 2..7, the last one's target is chunk two's first token.
    first = PromptLogprobRange(2, 6, next_token_id=p[8], top_logprobs_num=TOP)
    out = runner.step(
        StepInput(
            1,
            new_requests=[
                NewRequest("x", p[:8], pool.take(8), sample=False, prompt_logprobs=first),
                NewRequest("o", other, pool.take(len(other))),
            ],
        )
    )
    entries = list(out.prompt_logprobs[0].logprobs)
    second = PromptLogprobRange(0, 11, top_logprobs_num=TOP)
    out = runner.step(
        StepInput(
            2,
            continuing_requests=[
                ContinuingRequest("o", pool.take(1)),
                ContinuingRequest("x", pool.take(12), p[8:], prompt_logprobs=second),
            ],
        )
    )
    entries += out.prompt_logprobs[0].logprobs
    assert_matches_hf(hf, p, entries, first_token=3)


def run_core(runner, sched, requests):
    for req in requests:
        sched.add_request(req)
    got, finals = {}, {}
    while sched.has_work():
        plan = sched.schedule()
        out = runner.step(plan)
        for ev in sched.update(plan, out.outputs, out.prompt_logprobs):
            got.setdefault(ev.request_id, []).extend(ev.prompt_logprobs)
            if ev.finished:
                finals[ev.request_id] = ev
        assert sched.check_leak(deep=True) is None
    return got, finals


def test_scheduler_core_chunked_and_cached_prefix(models):
    hf, runner = models
    runner.reset()
    sched = Scheduler(
        scheduler_config(chunked_prefill_size=7, max_prefill_tokens=7, max_running_requests=8),
        runner.kv_slots,
        runner.config.context_length,
    )
    (p,) = prompts(13, 23)
    stop = StoppingCriteria(max_new_tokens=2)

    def asking(start):
        return SamplingParams(prompt_logprob_start=start, prompt_top_logprobs_num=TOP)

    got, finals = run_core(runner, sched, [Request("warm", p, stop)])
    assert got.get("warm", []) == []
    got, finals = run_core(
        runner, sched, [Request("all", p, stop, asking(0)), Request("tail", p, stop, asking(15))]
    )
    assert_matches_hf(hf, p, got["all"])
    assert_matches_hf(hf, p, got["tail"], first_token=15)
    assert finals["all"].cached_tokens == 0
    assert 0 < finals["tail"].cached_tokens <= 14
