"""NGRAM speculative decoding through the whole stack (`radixserve serve --speculative-algorithm NGRAM`
on the tiny random Llama; drafting chains, and trees with --speculative-ngram-max-bfs-breadth): greedy outputs and logprobs equal plain decoding's (a request with
min_new_tokens = max_new_tokens decodes without speculation, as the plan says, so it is the
reference), stop strings end the text, concurrent requests all finish, the counters reach /metrics
and /get_server_info, and the scheduler's idle leak check finds nothing."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.speculation import (
    PROMPT,
    check_concurrent_requests_finish,
    check_greedy_equals_plain_decoding,
    generate,
    speculative_stack,
    stack_log,
)


@pytest.fixture(scope="module", params=["chain", "tree"])
def stack(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("speculative")
    flags = ("--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "6")
    if request.param == "tree":  # draft_parents cross the scheduler -> executor hop
        flags += ("--speculative-ngram-max-bfs-breadth", "3")
    with speculative_stack(folder, *flags, "--enable-metrics") as running:
        yield running


def test_greedy_with_speculation_equals_plain_decoding(stack):
    check_greedy_equals_plain_decoding(stack)


def test_stop_strings_and_concurrent_requests(stack):
    reference = generate(stack, PROMPT, max_new_tokens=30)
    text = reference["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    if stop.strip():
        cut = generate(stack, PROMPT, max_new_tokens=30, stop=[stop])
        assert cut["text"] == text[: text.index(stop)]
    check_concurrent_requests_finish(stack, requests=12, threads=6, max_new_tokens=24)


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
    log = stack_log(stack)
    assert "leak" not in log, log[-2000:]
