"""A speculative verify step's rows are the decode steps' rows, bit for bit, on the CPU with the
embedded SmolLM2 served natively (Q4_1 kernels, torch-native attention): the K + 1 tokens of a verify
step run the GGUF kernels as K + 1 rows (kernels/gguf_cpu.cpp: a row's result does not depend on its
batch) and the attention per token as decode does. So NGRAM's greedy outputs equal plain decoding's."""

import pytest
import torch

from radixserve.common.config import RunnerConfig
from radixserve.common.model_files import resolve_model_path
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.runner import ModelRunner

PROMPT = [1, 9690, 198, 2683, 253, 1789, 4116, 563, 260, 2090, 282, 260, 7220, 6789, 30, 198]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def runner(request):
    config = RunnerConfig(
        dtype=request.param, device="cpu", quantization="gguf", max_total_tokens=256
    )
    return ModelRunner(resolve_model_path(None), config, keep_logits=True)


def prefill(runner) -> int:
    runner.reset()
    n = len(PROMPT)
    new = NewRequest("r", PROMPT, list(range(1, n + 1)), sampling=GREEDY)
    return runner.step(StepInput(1, new_requests=[new])).outputs[0].token_id


@pytest.mark.parametrize("drafts", [1, 4, 8, 15])
def test_verify_rows_equal_decode_rows(runner, drafts):
    n = len(PROMPT)
    tokens, decode_logits = [prefill(runner)], []
    for i in range(drafts + 1):
        out = runner.step(
            StepInput(i + 2, continuing_requests=[ContinuingRequest("r", [n + 1 + i])])
        )
        tokens.append(out.outputs[0].token_id)
        decode_logits.append(out.logits[0].float())

    prefill(runner)
    # The greedy continuation as drafts: all accepted, and each row's logits are a decode step's.
    step = ContinuingRequest(
        "r", list(range(n + 1, n + drafts + 2)), draft_ids=tokens[1 : drafts + 1]
    )
    out = runner.step(StepInput(2, continuing_requests=[step]))
    assert out.outputs[0].accepted_draft_ids == tokens[1 : drafts + 1]
    assert out.outputs[0].token_id == tokens[drafts + 1]
    assert out.logits.shape[0] == drafts + 1
    for j in range(drafts + 1):
        assert torch.equal(out.logits[j].float(), decode_logits[j]), j
