"""Tree drafts (NGRAM with --speculative-ngram-max-bfs-breadth above 1) end to end in one process: the
scheduler core plans verify steps whose drafts are trees, a real tiny ModelRunner (random Llama
weights, CPU) verifies them with each node on its own slot-table row. Greedy outputs equal plain
decoding's token for token and logprob for logprob; an oracle tree whose right continuation is never
the first branch gets all of that branch accepted and nothing of the others; the accepted path's KV
slots are the ones kept (later tokens read them) and the pool is whole after every step."""

from __future__ import annotations

import json
import random

import pytest

from radixserve.common.args import FlagError, ServerArgs, check_speculation
from radixserve.common.draft_tree import accepted_path, spare_rows, tree_error
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import ContinuingRequest, StepError, StepInput
from radixserve.executor.runner import ModelRunner
from radixserve.scheduler import decode as decode_module
from radixserve.scheduler.speculation import speculation_params
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
TREE = dict(
    speculative_algorithm="NGRAM",
    speculative_num_draft_tokens=7,
    speculative_ngram_max_bfs_breadth=3,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    # Untied embeddings: random tied ones mostly echo the last token, which any draft would predict.
    config = {**TINY_CONFIG, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_runner(model_dir, **config) -> ModelRunner:
    return cpu_runner(model_dir, POOL, load_format="dummy", **config)


# Prompts that repeat with variations: the same suffix occurs before with different continuations.
VARIED = [10, 11, 12, 13, 10, 11, 14, 15, 10, 11, 12, 16, 10, 11, 14, 13] * 2
MIXED = [
    ("var", VARIED, 40, greedy(return_logprob=True, top_logprobs_num=2), {}),
    ("short", [3, 4, 5], 12, greedy(), {}),
    ("long", list(range(20, 80)), 30, greedy(return_logprob=True), {}),
    ("rep", [7, 8, 9, 7, 8, 6] * 5, 25, greedy(), {}),
]


@pytest.fixture(scope="module")
def reference(model_dir):
    runner = make_runner(model_dir)
    return run(runner, make_scheduler(runner), MIXED)


def test_greedy_tree_drafts_equal_plain_decoding(model_dir, reference):
    runner = make_runner(model_dir, **TREE)
    assert runner.slot_table.spare_rows == spare_rows(
        256, 6, TINY_CONFIG["max_position_embeddings"]
    )
    sched = make_scheduler(runner, **TREE)
    drafted = recording_trees(runner)
    assert_same_outputs(run(runner, sched, MIXED), reference)
    stats = sched.spec_stats
    assert stats.verify_steps > 0 and stats.accepted_tokens > 0
    # Some steps verified real trees (a node with two children), not only chains.
    assert any(len(set(p)) < len(p) for p in drafted)


def recording_trees(runner):
    """The runner, recording the draft_parents of every tree it is sent."""
    trees: list[list[int]] = []
    step = runner.step

    def record(plan):
        trees.extend(list(c.draft_parents) for c in plan.continuing_requests if c.draft_parents)
        return step(plan)

    runner.step = record
    return trees


def oracle_tree(reference_tokens, right: bool):
    """A draft_tree_for whose tree puts a wrong token first at every depth and the reference's next
    token second (right), or only two wrong tokens (not right). Each wrong node gets the true token
    after it as a child: a verifier that followed a wrong branch would accept it."""

    def draft_tree_for(req, params, context_length):
        ref = reference_tokens[req.request_id]
        done = len(req.output_ids)
        budget = min(params.max_draft_tokens, req.remaining_new_tokens - 1)
        tokens: list[int] = []
        parents: list[int] = []

        def add(token, parent):
            if len(tokens) >= budget:
                return None
            tokens.append(token)
            parents.append(parent)
            return len(tokens) - 1

        node = -1
        upcoming = ref[done:]
        for t, after in zip(upcoming, upcoming[1:] + [None]):
            wrong = add((t + 1) % VOCAB, node)
            if wrong is None:
                break
            if after is not None:
                add(after, wrong)
            if not right:
                add((t + 2) % VOCAB, node)
                break
            node = add(t, node)
            if node is None:
                break
        assert tree_error(tokens, parents) is None
        return tokens, parents

    return draft_tree_for


@pytest.mark.parametrize("right", [True, False], ids=["right-branch-second", "all-wrong"])
def test_oracle_trees_accept_exactly_the_right_branch(model_dir, reference, monkeypatch, right):
    ref_tokens = reference[0]
    monkeypatch.setattr(decode_module, "draft_tree_for", oracle_tree(ref_tokens, right))
    runner = make_runner(model_dir, **TREE)
    sched = make_scheduler(runner, **TREE)
    tokens, _, _ = run(runner, sched, MIXED)
    assert tokens == ref_tokens
    stats = sched.spec_stats
    if right:
        assert stats.accepted_tokens > 0 and stats.accept_length > 2.0
    else:
        assert stats.accepted_tokens == 0 and stats.accept_length == 1.0


def test_a_steps_trees_stay_within_the_executors_spare_rows(model_dir, reference, monkeypatch):
    """With room for one tree per step (max_tree_draft_tokens as the executor reports it), the
    step's other requests draft chains; outputs stay plain decoding's."""
    ref_tokens = reference[0]
    monkeypatch.setattr(decode_module, "draft_tree_for", oracle_tree(ref_tokens, right=True))
    runner = make_runner(model_dir, **TREE)
    sched = make_scheduler(runner, **TREE)
    sched.decode.max_tree_rows = 6  # one tree of max_draft_tokens (6) per step
    steps = []
    step = runner.step

    def record(plan):
        drafting = [c for c in plan.continuing_requests if c.draft_ids]
        steps.append([len(c.draft_ids) for c in drafting if c.draft_parents])
        return step(plan)

    runner.step = record
    tokens, _, _ = run(runner, sched, MIXED)
    assert tokens == ref_tokens
    assert all(sum(trees) <= 6 for trees in steps) and any(trees for trees in steps)
    assert sched.spec_stats.draft_tokens > sum(sum(trees) for trees in steps)  # chains too


def test_accepted_path_slots_follow_the_root_in_the_executors_row(
    model_dir, reference, monkeypatch
):
    """After each verify step the request's row holds the root's slot then its accepted path's, in
    depth order, where its next steps read them (the outputs above depend on it; this checks the
    layout itself), and the scheduler keeps the same slots for the request's tokens."""
    ref_tokens = reference[0]
    monkeypatch.setattr(decode_module, "draft_tree_for", oracle_tree(ref_tokens, right=True))
    runner = make_runner(model_dir, **TREE)
    sched = make_scheduler(runner, **TREE)
    checked = []
    step = runner.step

    def check(plan):
        # The scheduler's slots of every running request are the executor's row (its radix cache
        # and its frees act on them).
        for rid, state in runner.states.items():
            req = sched.requests.get(rid)
            if req is not None and not req.drafts_inflight:
                row = runner.slot_table.tensor[state.table_row, : state.length].tolist()
                assert req.slots[: state.length] == row, rid
        sent = {c.request_id: c for c in plan.continuing_requests if c.draft_parents}
        out = step(plan)
        for o in out.outputs:
            c = sent.get(o.request_id)
            if c is None:
                continue
            path = accepted_path(list(c.draft_ids), list(c.draft_parents), o.accepted_draft_ids)
            state = runner.states[o.request_id]
            first = state.length - 1 - len(path)  # the root's position
            row = runner.slot_table.tensor[state.table_row, first : state.length].tolist()
            assert row == [c.new_slots[0], *(c.new_slots[1 + i] for i in path)]
            checked.append(len(path))
        return out

    runner.step = check
    tokens, _, _ = run(runner, sched, MIXED)
    assert tokens == ref_tokens
    assert checked and max(checked) >= 2


def test_sampled_and_overlapped_tree_drafts_keep_the_pool_whole(model_dir, reference):
    runner = make_runner(model_dir, **TREE)
    sched = make_scheduler(runner, **TREE)
    requests = [
        (f"s{i}", VARIED[i:], 30, SamplingParams(temperature=0.7, top_p=0.9, seed=i), {})
        for i in range(3)
    ] + [(f"g{i}", [7, 8, 9, 7, 8, 6] * 4, 20, greedy(), {}) for i in range(2)]
    tokens, _, _ = run(runner, sched, requests)
    assert all(len(tokens[r[0]]) == r[2] for r in requests)
    assert sched.spec_stats.verify_steps > 0

    runner = make_runner(model_dir, **TREE)
    sched = make_scheduler(runner, **TREE)
    rng = random.Random(3)
    arrivals = {i * 2: [r] for i, r in enumerate(MIXED)}
    got, aborted = run_overlapped(runner, sched, arrivals, rng)
    assert_greedy_outputs_match(MIXED, got, aborted, reference[0])


def test_executor_refuses_bad_trees(model_dir):
    runner = make_runner(model_dir, **TREE)
    runner.step(StepInput(1, new_requests=[new("a", [3, 4, 5], [1, 2, 3])]))

    def step(ids, parents, slots):
        return StepInput(
            2,
            continuing_requests=[
                ContinuingRequest("a", slots, draft_ids=ids, draft_parents=parents)
            ],
        )

    for ids, parents, why in [
        ([1, 2], [-1, 1], "parent 1"),
        ([1, 1], [-1, -1], "repeats a sibling"),
        ([1, 2], [-1], "1 draft_parents for 2"),
    ]:
        with pytest.raises(StepError, match=why):
            runner.step(step(ids, parents, [7, 8, 9]))
    # The refusals changed nothing: a valid tree runs next.
    out = runner.step(step([1, 2, 3], [-1, -1, 0], [7, 8, 9, 10]))
    assert out.outputs[0].request_id == "a"

    plain = make_runner(model_dir)  # no spare rows without the flag
    plain.step(StepInput(1, new_requests=[new("a", [3, 4, 5], [1, 2, 3])]))
    with pytest.raises(StepError, match="tree draft tokens"):
        plain.step(step([1, 2], [-1, -1], [7, 8, 9]))


def test_tree_flags_are_checked_at_start():
    assert speculation_params(scheduler_config(**TREE)).max_bfs_breadth == 3
    with pytest.raises(ValueError, match="--page-size 1"):
        speculation_params(scheduler_config(page_size=4, **TREE))
    with pytest.raises(FlagError, match="--tp-size 1"):
        check_speculation(ServerArgs(tp_size=2, **TREE))
