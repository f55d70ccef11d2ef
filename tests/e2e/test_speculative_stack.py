"""NGRAM speculative decoding through the whole stack (`radixserve serve --speculative-algorithm NGRAM`
on the tiny random Llama): greedy outputs and logprobs equal plain decoding's (a request with
min_new_tokens = max_new_tokens decodes without speculation, as the plan says, so it is the
reference), stop strings end the text, concurrent requests all finish, the counters reach /metrics
and /get_server_info, and the scheduler's idle leak check finds nothing."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.stack import stop_stack
from tests.tiny_stack import start_tiny_stack

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30] * 4
N = 40


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speculative")
    running = start_tiny_stack(
        folder,
        "--speculative-algorithm",
        "NGRAM",
        "--speculative-num-draft-tokens",
        "6",
        "--enable-metrics",
        "--chunked-prefill-size",
        "16",
    )
    yield running
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


def test_greedy_with_speculation_equals_plain_decoding(stack):
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


def test_stop_strings_and_concurrent_requests(stack):
    reference = generate(stack, PROMPT, max_new_tokens=30)
    text = reference["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    if stop.strip():
        cut = generate(stack, PROMPT, max_new_tokens=30, stop=[stop])
        assert cut["text"] == text[: text.index(stop)]
    prompts = [PROMPT[i:] for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        outs = list(
            pool.map(lambda p: generate(stack, p, max_new_tokens=24, temperature=0.7), prompts)
        )
    assert all(o["meta_info"]["completion_tokens"] == 24 for o in outs)


def test_metrics_and_no_leak_when_idle(stack):
    generate(stack, PROMPT)
    metrics = httpx.get(stack.base_url + "/metrics", timeout=60).text
    lines = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("radixserve:spec_")
    }
    assert lines["radixserve:spec_verify_steps_total"] > 0
    assert lines["radixserve:spec_accept_length"] >= 1.0
    with open(stack.log_path) as f:
        log = f.read()
    assert "leak" not in log, log[-2000:]
