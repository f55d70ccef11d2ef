"""Speculative decoding under tensor parallelism (two CPU shards over gloo): every shard runs the draft
(docs/speculative.md, "Tensor parallelism"), its layers split over the shards like the target's, and
rank 0 verifies and broadcasts; NGRAM's drafts come from the scheduler. Greedy outputs equal plain
decoding on one shard token for token, with logprobs within 1e-4 (fp32; the shards' partial sums add up
in another order); a head that always predicts the target gets every draft accepted on two shards as on
one. A follower that launched a step before reading the previous verify step's accepted counts
refused it and deadlocked the group at the second verify step: the spawn's timeout fails the test.

Draft acceptance of the random heads is not compared across shard counts: a random head's logits have
near-ties that another summation order may flip (a proposal changes, the output cannot)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.executor.eagle_tp_ranks import (  # noqa: E402
    build_runner,
    parse_case,
    run_cases_on_ranks,
    serve,
)
from tests.executor.test_eagle_draft import save_target_and_heads  # noqa: E402
from tests.executor.test_eagle_serving import (  # noqa: E402
    K,
    perturb,
    reproducing_head,
)
from tests.executor.test_eagle_draft import save_target  # noqa: E402


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{name: case string}: plain decoding and each draft kind, the served results on two shards
    ({case: outcome}) and on one."""
    root = tmp_path_factory.mktemp("eagle_tp")
    save_target_and_heads(root)
    save_target(root / "STANDALONE", layers=4, edit=perturb)
    target, exact_head = reproducing_head(root / "exact")
    named = {
        "plain": f"none:{root / 'target'}:",
        "EAGLE3": f"EAGLE3:{root / 'target'}:{root / 'EAGLE3'}",
        "STANDALONE": f"STANDALONE:{root / 'target'}:{root / 'STANDALONE'}",
        "NGRAM": f"NGRAM:{root / 'target'}:",
        "exact_plain": f"none:{target}:",
        "exact_EAGLE": f"EAGLE:{target}:{exact_head}",
    }
    two = run_cases_on_ranks(list(named.values()), root / "tp2.pt")
    return named, two


def one_shard(case: str) -> dict:
    algorithm, target, head = parse_case(case)
    runner = build_runner(algorithm, target, head)
    return serve(runner, runner, algorithm, head)


def assert_same_outputs(got: dict, ref: dict) -> None:
    assert got["tokens"] == ref["tokens"]
    assert got["finish"] == ref["finish"]
    for rid, values in ref["logprobs"].items():
        assert got["logprobs"][rid] == pytest.approx(values, abs=1e-4)


def test_two_shards_decode_plainly_as_one(cases):
    named, two = cases
    assert_same_outputs(two[named["plain"]], one_shard(named["plain"]))


@pytest.mark.parametrize("draft", ["EAGLE3", "STANDALONE", "NGRAM"])
def test_speculation_on_two_shards_keeps_plain_outputs(cases, draft):
    named, two = cases
    got = two[named[draft]]
    assert_same_outputs(got, one_shard(named["plain"]))
    spec = got["spec"]
    # The draft ran on the shards: every decode after the first token verified up to K drafts.
    assert spec["verify_steps"] > 0 and spec["draft_tokens"] >= spec["verify_steps"]
    if draft != "NGRAM":  # a draft proposes K tokens at every verify step (fewer near the end)
        assert spec["draft_tokens"] > spec["verify_steps"]
        assert spec["draft_tokens"] <= K * spec["verify_steps"]
    if draft == "STANDALONE":  # the perturbed target: right on some tokens, not all
        assert 0 < spec["accepted_tokens"] < spec["draft_tokens"]


def test_a_head_that_predicts_the_target_gets_every_draft_accepted_on_two_shards(cases):
    named, two = cases
    got, ref = two[named["exact_EAGLE"]], one_shard(named["exact_EAGLE"])
    assert_same_outputs(got, one_shard(named["exact_plain"]))
    assert got["spec"]["accepted_tokens"] == got["spec"]["draft_tokens"] > 0
    assert got["spec"] == ref["spec"]
