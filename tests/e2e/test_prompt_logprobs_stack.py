"""Prompt logprobs through the whole stack (`radixserve serve` on the tiny random Llama, prefill chunks of 8):
a prompt's logprobs at the positions of a greedy continuation equal the logprobs the continuation was
generated with, whether the prompt runs in chunks, whole, or behind a cached prefix; /v1/completions
echo reports the same numbers.

Tolerance: 1e-3 (float32 on the CPU; chunking changes the order of the attention sums)."""

from __future__ import annotations

import httpx
import pytest

from tests.stack import stop_stack
from tests.tiny_stack import MODEL, start_tiny_stack

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 1234, 88, 99, 2000, 3000, 4000, 5000]
TOL = 1e-3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    running = start_tiny_stack(
        tmp_path_factory.mktemp("prompt_logprobs"), "--chunked-prefill-size", "8"
    )
    yield running
    stop_stack(running)


def generate(stack, input_ids, max_new_tokens, **fields) -> dict:
    body = {
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
        "return_logprob": True,
        **fields,
    }
    r = httpx.post(stack.base_url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def values(entries) -> list:
    return [e[0] for e in entries]


def test_prompt_logprobs_match_the_generated_tokens_logprobs(stack):
    first = generate(stack, PROMPT, 6, logprob_start_len=0, top_logprobs_num=2)
    meta = first["meta_info"]
    assert [e[1] for e in meta["input_token_logprobs"]] == PROMPT
    assert meta["input_token_logprobs"][0][0] is None
    generated = values(meta["output_token_logprobs"])

    # The prompt and the continuation but its last token as one prompt: its logprobs at the
    # continuation's positions are the generated tokens'.
    longer = PROMPT + first["output_ids"][:-1]
    whole = generate(stack, longer, 1, logprob_start_len=0)["meta_info"]
    assert values(whole["input_token_logprobs"][len(PROMPT) :]) == pytest.approx(
        generated[:-1], abs=TOL
    )
    assert values(whole["input_token_logprobs"][1 : len(PROMPT)]) == pytest.approx(
        values(meta["input_token_logprobs"][1:]), abs=TOL
    )
    assert whole["cached_tokens"] == 0

    # From the continuation on only: the prompt's prefix comes from the cache.
    tail = generate(stack, longer, 1, logprob_start_len=len(PROMPT))["meta_info"]
    assert 0 < tail["cached_tokens"] <= len(PROMPT) - 1
    assert values(tail["input_token_logprobs"]) == pytest.approx(generated[:-1], abs=TOL)

    r = httpx.post(
        stack.base_url + "/v1/completions",
        json={
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 2,
            "echo": True,
            "logprobs": 1,
            "temperature": 0,
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    echoed = r.json()["choices"][0]["logprobs"]
    assert echoed["token_logprobs"][0] is None
    assert echoed["token_logprobs"][1 : len(PROMPT)] == pytest.approx(
        values(meta["input_token_logprobs"][1:]), abs=TOL
    )
    assert echoed["token_logprobs"][len(PROMPT) :] == pytest.approx(generated[:2], abs=TOL)
    assert len(echoed["tokens"]) == len(PROMPT) + 2
