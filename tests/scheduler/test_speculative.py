"""Speculative decoding (NGRAM) end to end in one process: the scheduler core plans verify steps and a
real tiny ModelRunner (random Llama weights, CPU) runs them. Greedy outputs with speculation equal
those without, token for token and logprob for logprob; oracle drafts (the reference's own next tokens)
are all accepted, wrong ones never; stop tokens inside an accepted draft end the request there; and
the KV pool is whole after every step and at the end."""

from __future__ import annotations

import json

import pytest

from radixserve.common.sampling import SamplingParams
from radixserve.common.step import ContinuingRequest, StepError, StepInput
from radixserve.executor.runner import ModelRunner
from radixserve.scheduler import decode as decode_module
from tests.configs import scheduler_config
from tests.executor.tiny_llama import TINY_CONFIG, VOCAB, cpu_runner, new
from tests.spec_serving import (
    assert_greedy_outputs_match,
    assert_same_outputs,
    greedy,
    make_scheduler,
    run,
    run_overlapped,
)

POOL = 400


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    # Untied embeddings: random tied ones mostly echo the last token, which any draft would predict.
    config = {**TINY_CONFIG, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_runner(model_dir) -> ModelRunner:
    return cpu_runner(model_dir, POOL, load_format="dummy")


REPEATING = [10, 11, 12, 13, 14, 15] * 6
MIXED = [
    ("rep", REPEATING, 40, greedy(return_logprob=True, top_logprobs_num=2), {}),
    ("short", [3, 4, 5], 12, greedy(), {}),
    ("long", list(range(20, 80)), 30, greedy(return_logprob=True), {}),
    ("pen", REPEATING[:12], 16, greedy(frequency_penalty=0.5), {}),
    ("rep2", [7, 8, 9] * 5, 25, greedy(), {}),
]


@pytest.fixture(scope="module")
def reference(model_dir):
    runner = make_runner(model_dir)
    return run(runner, make_scheduler(runner), MIXED)


def test_greedy_ngram_equals_plain_decoding_token_for_token(model_dir, reference):
    runner = make_runner(model_dir)
    sched = make_scheduler(runner, speculative_algorithm="NGRAM", speculative_num_draft_tokens=5)
    assert_same_outputs(run(runner, sched, MIXED), reference)
    stats = sched.spec_stats
    # The repeating prompts make n-gram drafts that the model partly follows.
    assert stats.verify_steps > 0 and stats.accepted_tokens > 0
    assert 1.0 < stats.accept_length <= 5.0


def oracle(reference_tokens, wrong: bool):
    """A draft_for that proposes the reference's own next tokens (or, wrong, a different token at
    each of them)."""

    def draft_for(req, params, context_length):
        ref = reference_tokens[req.request_id]
        done = len(req.output_ids)
        k = min(params.max_draft_tokens, req.remaining_new_tokens - 1)
        draft = ref[done : done + k]
        return [(t + 1) % VOCAB for t in draft] if wrong else draft

    return draft_for


@pytest.mark.parametrize("wrong", [False, True], ids=["always-right", "always-wrong"])
def test_forced_drafts_accepted_length(model_dir, reference, monkeypatch, wrong):
    ref_tokens = reference[0]
    monkeypatch.setattr(decode_module, "draft_for", oracle(ref_tokens, wrong))
    runner = make_runner(model_dir)
    sched = make_scheduler(runner, speculative_algorithm="NGRAM", speculative_num_draft_tokens=5)
    requests = [r for r in MIXED if r[0] != "pen"]
    tokens, _, _ = run(runner, sched, requests)
    assert tokens == {r: t for r, t in ref_tokens.items() if r != "pen"}
    stats = sched.spec_stats
    if wrong:
        assert stats.accepted_tokens == 0 and stats.accept_length == 1.0
    else:
        assert stats.accepted_tokens == stats.draft_tokens
        # Every step of a request drafts min(4, tokens left - 1): 4 accepted per full step.
        assert stats.accept_length > 4.0


def recording_steps(runner):
    """The runner, recording each step's (decoding requests, their tokens with drafts) when it has no prefill."""
    seen: list[tuple[int, int]] = []
    step = runner.step

    def record(plan):
        if not plan.new_requests and all(not c.input_ids for c in plan.continuing_requests):
            reqs = plan.continuing_requests
            seen.append((len(reqs), sum(1 + len(c.draft_ids) for c in reqs)))
        return step(plan)

    runner.step = record
    return seen


@pytest.mark.parametrize("limit", ["graph-rows", "batch-size"])
def test_drafts_stay_within_the_graph_rows_and_the_batch_size_limit(
    model_dir, reference, monkeypatch, limit
):
    ref_tokens = reference[0]
    monkeypatch.setattr(decode_module, "draft_for", oracle(ref_tokens, wrong=False))
    runner = make_runner(model_dir)
    seen = recording_steps(runner)
    config = dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=5)
    if limit == "batch-size":
        config["speculative_disable_by_batch_size"] = 2
    sched = make_scheduler(runner, max_graph_tokens=9 if limit == "graph-rows" else 0, **config)
    requests = [r for r in MIXED if r[0] != "pen"]
    tokens, _, _ = run(runner, sched, requests)
    assert tokens == {r: t for r, t in ref_tokens.items() if r != "pen"}
    if limit == "graph-rows":
        assert max(rows for _, rows in seen) == 9  # 4 requests: 5 drafts left, not 16
    else:
        assert all(rows == n for n, rows in seen if n > 2)
        assert any(n > 2 for n, _ in seen) and any(rows > n for n, rows in seen)
    assert sched.spec_stats.accepted_tokens == sched.spec_stats.draft_tokens > 0


def test_stop_token_inside_accepted_draft_ends_the_request(model_dir, reference, monkeypatch):
    ref = reference[0]["long"]
    stop = ref[6]
    assert stop not in ref[:6]
    monkeypatch.setattr(decode_module, "draft_for", oracle(reference[0], wrong=False))
    runner = make_runner(model_dir)
    sched = make_scheduler(runner, speculative_algorithm="NGRAM", speculative_num_draft_tokens=9)
    tokens, _, finals = run(
        runner, sched, [("long", list(range(20, 80)), 30, greedy(), {"stop_token_ids": [stop]})]
    )
    assert tokens["long"] == ref[:7] and finals["long"].matched_stop_token_id == stop


def test_sampled_requests_with_drafts_keep_the_pool_whole(model_dir):
    runner = make_runner(model_dir)
    sched = make_scheduler(runner, speculative_algorithm="NGRAM", speculative_num_draft_tokens=4)
    requests = [
        (f"s{i}", REPEATING[i:], 30, SamplingParams(temperature=0.7, top_p=0.9, seed=i), {})
        for i in range(4)
    ] + [(f"g{i}", [7, 8, 9] * 4, 20, greedy(), {}) for i in range(3)]
    tokens, _, finals = run(runner, sched, requests)
    assert all(len(tokens[r[0]]) == r[2] for r in requests)
    assert all(0 <= t < VOCAB for ts in tokens.values() for t in ts)
    assert sched.spec_stats.verify_steps > 0


def test_executor_refuses_drafts_it_cannot_verify(model_dir):
    runner = make_runner(model_dir)
    runner.step(
        StepInput(
            1,
            new_requests=[
                new("a", [3, 4, 5], [1, 2, 3]),
                new("p", [3, 4, 5], [4, 5, 6], sampling=greedy(presence_penalty=1.0)),
            ],
        )
    )
    with pytest.raises(StepError, match="token ids"):
        runner.step(
            StepInput(2, continuing_requests=[ContinuingRequest("a", [7, 8], draft_ids=[VOCAB])])
        )
    with pytest.raises(StepError, match="penalties"):
        runner.step(
            StepInput(2, continuing_requests=[ContinuingRequest("p", [7, 8], draft_ids=[1])])
        )
    with pytest.raises(StepError, match="new_slots"):
        runner.step(StepInput(2, continuing_requests=[ContinuingRequest("a", [7], draft_ids=[1])]))
    # A valid verify step then moves the length by the accepted tokens only.
    out = runner.step(
        StepInput(2, continuing_requests=[ContinuingRequest("a", [7, 8, 9], draft_ids=[1, 1])])
    )
    a = len(out.outputs[0].accepted_draft_ids)
    assert runner.states["a"].length == 3 + 1 + a


def test_flags_make_the_ngram_settings():
    from radixserve.common.args import FlagError, check_speculation
    from radixserve.scheduler.ngram_proposer import NgramParams
    from radixserve.scheduler.speculation import ngram_params

    assert ngram_params(scheduler_config()) is None
    assert ngram_params(scheduler_config(speculative_algorithm="NGRAM")) == NgramParams()
    params = ngram_params(
        scheduler_config(
            speculative_algorithm="NGRAM",
            speculative_num_draft_tokens=4,
            speculative_ngram_min_match_window_size=2,
            speculative_ngram_max_match_window_size=5,
        )
    )
    assert params == NgramParams(2, 5, 3, NgramParams().history_window)
    for bad in (
        {"speculative_num_draft_tokens": 1},
        {"speculative_disable_by_batch_size": 0},
        {
            "speculative_ngram_min_match_window_size": 6,
            "speculative_ngram_max_match_window_size": 5,
        },
    ):
        with pytest.raises(FlagError):
            check_speculation(scheduler_config(speculative_algorithm="NGRAM", **bad))
    # EAGLE's settings are not n-gram ones (test_eagle_serving.py checks them).
    assert ngram_params(scheduler_config(speculative_algorithm="EAGLE")) is None


@pytest.mark.parametrize("page_size,mixed", [(1, False), (4, True)])
def test_mixed_traffic_with_overlap_chunking_and_pages_leaves_the_pool_whole(
    model_dir, page_size, mixed
):
    import random

    rng = random.Random(page_size)
    requests = []
    for i in range(16):
        unit = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))]
        prompt = (unit * 12)[: rng.randint(3, 30)]
        kind = rng.random()
        if kind < 0.15:
            sampling = SamplingParams(temperature=0.8, seed=i)
        elif kind < 0.25:
            sampling = greedy(repetition_penalty=1.2)
        else:
            sampling = greedy(return_logprob=kind < 0.4)
        requests.append((f"r{i}", prompt, rng.randint(1, 24), sampling, {}))
    config = dict(page_size=page_size, chunked_prefill_size=8, enable_mixed_chunk=mixed)
    runner = make_runner(model_dir)
    ref, _, _ = run(runner, make_scheduler(runner, **config), requests)
    runner = make_runner(model_dir)
    sched = make_scheduler(
        runner, speculative_algorithm="NGRAM", speculative_num_draft_tokens=6, **config
    )
    arrivals = {}
    for req in requests:
        arrivals.setdefault(rng.randrange(40), []).append(req)
    tokens, aborted = run_overlapped(runner, sched, arrivals, rng)
    assert_greedy_outputs_match(requests, tokens, aborted, ref)
    assert sched.spec_stats.accepted_tokens > 0
