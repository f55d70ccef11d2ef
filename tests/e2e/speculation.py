"""What the speculative-decoding stack tests share (test_speculative_stack.py: NGRAM,
test_eagle_stack.py: EAGLE): a tiny stack started with the algorithm's flags, /generate with greedy
token ids and logprobs, the speculation counters, and the checks both make: greedy speculation
equals plain decoding (a request with min_new_tokens = max_new_tokens decodes without speculation,
so it is the reference) and concurrent sampled requests all finish."""

from __future__ import annotations

import concurrent.futures
import contextlib

import httpx
import pytest

from tests.stack import stop_stack
from tests.tiny_stack import start_tiny_stack

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30] * 4
N = 40


@contextlib.contextmanager
def speculative_stack(folder, *flags: str):
    """The tiny stack in folder with flags (the algorithm's) and chunked prefill of 16, stopped after."""
    running = start_tiny_stack(folder, *flags, "--chunked-prefill-size", "16")
    try:
        yield running
    finally:
        stop_stack(running)


def generate(stack, input_ids, max_new_tokens=N, **sampling) -> dict:
    body = {
        "input_ids": input_ids,
        "sampling_params": {
            "temperature": 0,
            "max_new_tokens": max_new_tokens,
            "ignore_eos": True,
            **sampling,
        },
        "return_logprob": True,
    }
    r = httpx.post(stack.base_url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def tokens_and_logprobs(out):
    pairs = out["meta_info"]["output_token_logprobs"]
    return [p[1] for p in pairs], [p[0] for p in pairs]


def spec_counters(stack) -> dict:
    info = httpx.get(stack.base_url + "/get_server_info", timeout=60).json()["scheduler"]
    return {k: int(info[k]) for k in ("spec_verify_steps", "spec_accepted_tokens")}


def check_greedy_equals_plain_decoding(stack) -> None:
    before = spec_counters(stack)
    plain = generate(stack, PROMPT, min_new_tokens=N)
    assert spec_counters(stack) == before  # min_new_tokens pending: no drafts
    speculated = generate(stack, PROMPT)
    after = spec_counters(stack)
    assert after["spec_verify_steps"] > before["spec_verify_steps"]
    plain_tokens, plain_logprobs = tokens_and_logprobs(plain)
    tokens, logprobs = tokens_and_logprobs(speculated)
    assert tokens == plain_tokens and len(tokens) == N
    assert logprobs == pytest.approx(plain_logprobs, abs=1e-3)


def check_concurrent_requests_finish(stack, requests: int, threads: int, max_new_tokens: int):
    """requests sampled requests (PROMPT less its first i tokens) over threads threads all finish."""
    prompts = [PROMPT[i:] for i in range(requests)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        outs = list(
            pool.map(
                lambda p: generate(stack, p, max_new_tokens=max_new_tokens, temperature=0.7),
                prompts,
            )
        )
    assert all(o["meta_info"]["completion_tokens"] == max_new_tokens for o in outs)


def stack_log(stack) -> str:
    with open(stack.log_path) as f:
        return f.read()
