"""SGLang's token_ids_logprob: the logprobs of given token ids at every output position, from the same
distribution as the sampled token's logprob; rows asking for fewer ids (or none) are unaffected by
the others', and ids outside the vocabulary are refused before the step runs."""

import pytest
import torch

from radixserve.common.sampling import SamplingParams
from radixserve.common.step import StepError, StepInput
from radixserve.common.step_convert import output_from_proto, output_to_proto
from radixserve.executor.sampling import sample
from tests.executor.tiny_llama import VOCAB, new


def test_sampler_gathers_each_rows_ids():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(return_logprob=True, token_ids_logprob=(7, 3, 40)),
        SamplingParams(return_logprob=True),
        SamplingParams(return_logprob=True, token_ids_logprob=(11,)),
    ]
    res = sample(logits, params, [None] * 3)
    expected = torch.log_softmax(logits, -1)
    assert [t for t, _ in res.token_ids_logprobs[0]] == [7, 3, 40]
    assert [lp for _, lp in res.token_ids_logprobs[0]] == pytest.approx(
        expected[0, [7, 3, 40]].tolist(), abs=1e-6
    )
    assert res.token_ids_logprobs[1] == []
    assert res.token_ids_logprobs[2] == [(11, pytest.approx(expected[2, 11].item(), abs=1e-6))]


def test_runner_reports_them_from_the_sampled_distribution_and_they_survive_the_proto(runner):
    asked = SamplingParams(return_logprob=True, token_ids_logprob=(5, 9, 100), top_logprobs_num=2)
    out = runner.step(
        StepInput(
            1,
            new_requests=[
                new("a", [3, 4, 5], [1, 2, 3], sampling=asked),
                new("b", [6, 7], [4, 5], sampling=SamplingParams(return_logprob=True)),
            ],
        )
    )
    expected = torch.log_softmax(out.logits[0].cpu(), -1)
    a, b = out.outputs
    assert [t for t, _ in a.token_ids_logprobs] == [5, 9, 100]
    assert [lp for _, lp in a.token_ids_logprobs] == pytest.approx(
        expected[[5, 9, 100]].tolist(), abs=1e-5
    )
    assert b.token_ids_logprobs == []
    back = output_from_proto(output_to_proto(out)).outputs[0]
    assert [t for t, _ in back.token_ids_logprobs] == [5, 9, 100]
    assert back.top_logprobs and back.logprob == pytest.approx(a.logprob)


def test_ids_outside_the_vocabulary_are_refused(runner):
    bad = SamplingParams(return_logprob=True, token_ids_logprob=(VOCAB,))
    with pytest.raises(StepError, match="token_ids_logprob"):
        runner.step(StepInput(1, new_requests=[new("a", [3, 4], [1, 2], sampling=bad)]))
    assert runner.states == {}
