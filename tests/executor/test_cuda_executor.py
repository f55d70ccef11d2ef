"""The GPU executor on a real CUDA device (selected with `-m cuda` on a GPU machine).

A tiny random Llama in bfloat16: decode steps replayed from CUDA graphs give the same logits as the
same steps run eagerly (same kernels; graphs only add padding rows that must not disturb real ones),
for batch sizes that hit a bucket exactly and ones that need padding; and greedy tokens through the
graphs equal HF transformers' generate in float32 on the same weights.
"""

import pytest
import torch
import transformers

from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from tests.executor.hf_parity import build_hf_model

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-cuda")
    build_hf_model(
        transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        ),
        folder,
    )
    return folder


def run_steps(runner: ModelRunner, batch: int, steps: int) -> list[torch.Tensor]:
    runner.reset()
    g = torch.Generator().manual_seed(batch)
    span = 40 + steps
    new = [
        NewRequest(
            f"r{b}",
            torch.randint(0, 512, (9 + 3 * b,), generator=g).tolist(),
            list(range(1 + b * span, 1 + b * span + 9 + 3 * b)),
        )
        for b in range(batch)
    ]
    out = runner.step(StepInput(1, new_requests=new))
    logits = [out.logits]
    for s in range(steps):
        cont = [ContinuingRequest(f"r{b}", [1 + b * span + 9 + 3 * b + s]) for b in range(batch)]
        logits.append(runner.step(StepInput(2 + s, continuing_requests=cont)).logits)
    return logits


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_graphs_equal_eager(folder, batch):
    eager = ModelRunner(
        folder, runner_config(dtype="bfloat16", device="cuda", max_total_tokens=2048)
    )
    graphs = ModelRunner(
        folder,
        runner_config(dtype="bfloat16", device="cuda", max_total_tokens=2048, cuda_graph_max_bs=8),
    )
    assert graphs.cuda_graphs is not None and graphs.cuda_graphs.buckets == [1, 2, 4, 8]
    for a, b in zip(run_steps(eager, batch, 6), run_steps(graphs, batch, 6)):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_greedy_through_graphs_matches_hf(folder):
    hf = (
        transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    )
    runner = ModelRunner(
        folder,
        runner_config(dtype="float32", device="cuda", max_total_tokens=2048, cuda_graph_max_bs=4),
    )
    prompt = list(range(5, 25))
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([prompt], device="cuda"),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    out = runner.step(StepInput(1, new_requests=[NewRequest("g", prompt, list(range(1, 21)))]))
    got = [out.outputs[0].token_id]
    for s in range(23):
        out = runner.step(StepInput(2 + s, continuing_requests=[ContinuingRequest("g", [21 + s])]))
        got.append(out.outputs[0].token_id)
    assert got == expected
