"""End to end with chunked prefill, mixed prefill+decode steps and 4-slot pages: tiny chunks (16
tokens) so every prompt is split, through all five processes with the real SmolLM2 (float32)."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from radixserve.common.model_files import resolve_model_path
from tests.stack import FIXED_PROMPT, running_stack, wait_idle_and_check_no_leak

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(
        tmp_path_factory.mktemp("chunked"),
        "--dtype",
        "float32",
        "--quantization",
        "unquant",  # compared exactly with HF transformers on the dequantized weights
        "--max-total-tokens",
        "20000",
        "--chunked-prefill-size",
        "16",
        "--enable-mixed-chunk",
        "--page-size",
        "4",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(None))


def generate(stack, ids: list[int], n: int) -> list[int]:
    r = httpx.post(
        stack.base_url + "/generate",
        timeout=300,
        json={
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def test_chunked_greedy_tokens_equal_hf_transformers(stack, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer(" ".join([FIXED_PROMPT] * 5))["input_ids"]
    assert len(ids) > 40  # three chunks at least
    hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(None), dtype=torch.float32)
    with torch.inference_mode():
        expected = hf.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24
        )[0, len(ids) :].tolist()
    assert generate(stack, ids, 24) == expected


def test_concurrent_mixed_steps_give_each_request_its_alone_output(stack, tokenizer):
    prompts = [
        tokenizer(f"Story {i}: " + "once upon a time " * (2 + 3 * i))["input_ids"] for i in range(8)
    ]
    alone = [generate(stack, p, 12) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: generate(stack, p, 12), prompts))
    assert together == alone
    wait_idle_and_check_no_leak(stack)
