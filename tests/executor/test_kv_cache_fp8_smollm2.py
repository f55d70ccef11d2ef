"""The embedded SmolLM2-135M-Instruct on the CPU (bf16, torch_native) with an fp8 KV cache against the
same model with its bf16 KV: the mean NLL of a fixed text within 2% (tests/executor/nll.py), and the
same greedy answer to "What is the capital of France?" (Paris; see SAME_TOKENS). No KV scales: 1.0, as for a
checkpoint that ships none."""

import pytest
from transformers import AutoTokenizer

from radixserve.common.model_files import resolve_model_path
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from tests.executor.nll import TEXT, mean_nll

ANSWER_TOKENS = 8
# Greedy tokens that must equal bf16's: e4m3 keeps the whole answer ("The capital of France is
# Paris.<|im_end|>"); e5m2 (2 mantissa bits) keeps "The capital of France is Paris" and then says
# ", France" instead of "." (measured; its NLL stays within 2%).
SAME_TOKENS = {"fp8_e4m3": ANSWER_TOKENS, "fp8_e5m2": 6}


@pytest.fixture(scope="module")
def folder():
    return resolve_model_path(None)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


def run(folder, tokenizer, kv_cache_dtype: str) -> tuple[float, list[int]]:
    runner = ModelRunner(
        folder,
        # The dequantized weights these figures were measured with (natively, bf16's first token of
        # the France question is a near-tie that "L'" wins: test_e2e_default_dtype.py).
        runner_config(
            dtype="bfloat16",
            device="cpu",
            quantization="unquant",
            kv_cache_dtype=kv_cache_dtype,
            max_total_tokens=512,
        ),
    )
    nll = mean_nll(runner, tokenizer(TEXT)["input_ids"])
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompt = tokenizer(chat, add_special_tokens=False)["input_ids"]
    n = len(prompt)
    out = runner.step(StepInput(1, new_requests=[NewRequest("q", prompt, list(range(1, n + 1)))]))
    tokens = [out.outputs[0].token_id]
    for i in range(
        ANSWER_TOKENS - 1
    ):  # decode steps: attention reads the whole prompt from the pool
        out = runner.step(
            StepInput(2 + i, continuing_requests=[ContinuingRequest("q", [n + 1 + i])])
        )
        tokens.append(out.outputs[0].token_id)
    return nll, tokens


@pytest.fixture(scope="module")
def bf16(folder, tokenizer):
    return run(folder, tokenizer, "auto")


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e5m2", "fp8_e4m3"])
def test_fp8_kv_keeps_nll_and_answer(folder, tokenizer, bf16, kv_cache_dtype):
    ref_nll, ref_tokens = bf16
    assert "Paris" in tokenizer.decode(ref_tokens)
    nll, tokens = run(folder, tokenizer, kv_cache_dtype)
    assert abs(nll - ref_nll) <= 0.02 * ref_nll, (nll, ref_nll)
    same = SAME_TOKENS[kv_cache_dtype]
    assert tokens[:same] == ref_tokens[:same], (
        tokenizer.decode(tokens),
        tokenizer.decode(ref_tokens),
    )
    assert "Paris" in tokenizer.decode(tokens)
