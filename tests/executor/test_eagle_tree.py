"""EAGLE / EAGLE3 tree drafts (--speculative-eagle-topk above 1) end to end in one process: the
executor's head keeps the topk likeliest branches over its rounds and proposes a tree; the scheduler
sends it back as the next step's draft with its parents; the target verifies it in one step.

Covers: greedy outputs equal plain decoding's with chunked prefill (and trees were proposed); every
proposed node's children are the likeliest tokens of the head run from scratch over the sequence and
the node's branch (each branch of the head's rounds attends to its own ancestors); overlapped random
traffic leaves the pool whole; the tree selection keeps parents before children; the flags are checked
at start."""

from __future__ import annotations

import random

import pytest
import torch

from radixserve.common.draft_tree import is_chain, path_to, tree_error
from radixserve.common.sampling import SamplingParams
from radixserve.executor.attention.torch_native import TorchNativeAttentionBackend
from radixserve.executor.eagle_proposer import DraftRequest, EagleProposer
from radixserve.scheduler.speculation import EagleParams, speculation_params
from tests.configs import scheduler_config
from tests.executor.test_eagle_serving import (
    CHUNKED,
    REQUESTS,
    folders,  # noqa: F401 (a fixture)
    make_runner,
    make_scheduler,
    prompts,
    reference,  # noqa: F401 (a fixture)
)
from tests.executor.test_eagle_draft import run_target
from tests.spec_serving import (
    add_requests,
    assert_greedy_outputs_match,
    assert_same_outputs,
    greedy,
    run,
    run_overlapped,
)

TOPK = 3
CPU = torch.device("cpu")


def tree_flags(topk=TOPK, num_draft_tokens=None) -> dict:
    flags = dict(speculative_eagle_topk=topk)
    if num_draft_tokens is not None:
        flags["speculative_num_draft_tokens"] = num_draft_tokens
    return flags


def recording_proposals(runner):
    """The runner, recording every proposed (tokens, parents) pair."""
    seen = []
    step = runner.step

    def record(plan):
        out = step(plan)
        seen.extend(
            (o.proposed_draft_ids, o.proposed_draft_parents)
            for o in out.outputs
            if o.proposed_draft_ids
        )
        return out

    runner.step = record
    return seen


@pytest.mark.parametrize("algorithm", ["EAGLE", "EAGLE3"])
def test_greedy_eagle_trees_equal_plain_decoding(folders, reference, algorithm):  # noqa: F811
    head = folders / algorithm
    runner = make_runner(folders / "target", algorithm, head, **tree_flags())
    assert runner.slot_table.spare_rows > 0
    sched = make_scheduler(runner, algorithm, head, **CHUNKED, **tree_flags())
    proposed = recording_proposals(runner)
    assert_same_outputs(run(runner, sched, REQUESTS), reference)
    assert proposed and all(tree_error(t, p) is None for t, p in proposed)
    assert all(len(t) == 3 * TOPK for t, _ in proposed)  # the default: num_steps * topk nodes
    assert any(not is_chain(p) for _, p in proposed)
    stats = sched.spec_stats
    assert stats.verify_steps > 0 and stats.draft_tokens > stats.verify_steps


def head_from_scratch(runner, algorithm, seq, path):
    """The head's log-probabilities (target ids) after seq and then the draft tokens path, run from
    scratch by a fresh chain proposer whose choices are forced to path: round 1 over seq's positions,
    then one round per path token on the head's own hidden state."""
    fresh = EagleProposer(
        runner.eagle.head, 200, 1, len(path) + 1, TorchNativeAttentionBackend(), CPU, torch.float32
    )
    forced, logits = iter(path), []

    def choose(to_logits, keep=True):
        logits.append(fresh.draft.compute_logits(to_logits))
        token = next(forced, None)
        return torch.tensor([token]) if token is not None else logits[-1].argmax(-1)

    fresh._proposed = choose
    n = len(seq) - 1  # the last token has no KV yet
    table = torch.zeros(1, 128, dtype=torch.int64)
    table[0, :n] = torch.arange(1, n + 1)
    out, captured = run_target(runner.model, seq[:n])
    hidden = captured if algorithm == "EAGLE3" else out
    fresh.propose(
        table, [DraftRequest(0, 0, seq[1:], list(range(1, n + 1)))], hidden, len(path) + 1
    )
    return torch.log_softmax(logits[-1][0].float(), dim=-1).clamp(min=-1e4)


@pytest.mark.parametrize("algorithm", ["EAGLE", "EAGLE3"])
def test_tree_children_are_the_heads_likeliest_after_their_branch(folders, algorithm):  # noqa: F811
    """Each proposed node's children, in order, are the likeliest tokens of the head run from
    scratch over the sequence and the node's own branch: every branch of the head's rounds attended
    to its own ancestors' draft K/V (a branch reading a sibling's, or the scratch slots mixed up,
    would change them)."""
    head, topk = folders / algorithm, 2
    runner = make_runner(folders / "target", algorithm, head, **tree_flags(topk))
    with torch.no_grad():  # sharper attention in the head: each branch's own K/V weighs more
        for name, weight in runner.eagle.head.named_parameters():
            if "qkv_proj" in name or "o_proj" in name:
                weight.mul_(4.0)
    sched = make_scheduler(runner, algorithm, head, disable_radix_cache=True, **tree_flags(topk))
    add_requests(sched, REQUESTS[:2])
    seen = []
    while (plan := sched.schedule()) is not None:
        out = runner.step(plan)
        live = {o.request_id: list(sched.requests[o.request_id].seq) for o in out.outputs}
        events = sched.update(plan, out.outputs, out.prompt_logprobs)
        done = {e.request_id for e in events if e.finished}
        seen += [
            (live[o.request_id] + o.accepted_draft_ids + [o.token_id], o)
            for o in out.outputs
            if o.request_id not in done and o.proposed_draft_parents
        ]
    assert len(seen) > 5
    checked = 0
    for seq, o in seen:
        tokens, parents = o.proposed_draft_ids, o.proposed_draft_parents
        for node in range(-1, len(tokens)):
            kids = [tokens[i] for i, p in enumerate(parents) if p == node]
            if not kids:
                continue
            path = [tokens[i] for i in path_to(parents, node)] if node >= 0 else []
            logp = head_from_scratch(runner, algorithm, seq, path)
            likeliest = runner.eagle.head.to_target_ids(logp.topk(topk).indices).tolist()
            assert kids == likeliest[: len(kids)], (node, path)
            checked += 1
    assert checked > 10


def test_random_traffic_with_eagle_trees_leaves_the_pool_whole(folders):  # noqa: F811
    rng = random.Random(5)
    requests = []
    for i, prompt in enumerate(prompts(21, 12)):
        kind = rng.random()
        sampling = (
            SamplingParams(temperature=0.8, seed=i)
            if kind < 0.3
            else greedy(return_logprob=kind < 0.5)
        )
        requests.append((f"r{i}", prompt, rng.randint(1, 20), sampling, {}))
    config = dict(chunked_prefill_size=8, enable_mixed_chunk=True)
    runner = make_runner(folders / "target")
    ref, _, _ = run(runner, make_scheduler(runner, **config), requests)
    head = folders / "EAGLE3"
    runner = make_runner(folders / "target", "EAGLE3", head, **tree_flags(2))
    sched = make_scheduler(runner, "EAGLE3", head, **config, **tree_flags(2))
    arrivals = {}
    for req in requests:
        arrivals.setdefault(rng.randrange(30), []).append(req)
    tokens, aborted = run_overlapped(runner, sched, arrivals, rng)
    assert_greedy_outputs_match(requests, tokens, aborted, ref)
    assert sched.spec_stats.verify_steps > 0


def test_selection_keeps_the_likeliest_nodes_with_their_parents():
    # Round 1: nodes 0, 1 (scores -0.1, -0.5); round 2: children 2..5 of nodes 0, 0, 1, 1.
    scores = [torch.tensor([[-0.1, -0.5]]), torch.tensor([[-0.2, -3.0, -0.6, -0.7]])]
    tokens = [torch.tensor([[10, 11]]), torch.tensor([[20, 21, 22, 23]])]
    parents = [torch.tensor([[-1, -1]]), torch.tensor([[0, 0, 1, 1]])]
    depth = [torch.zeros(1, 2), torch.ones(1, 4)]
    token, parent = EagleProposer._select(scores, tokens, parents, depth, 4)
    # The four likeliest: 0 (-0.1), 2 (-0.2), 1 (-0.5), 4 (-0.6), listed by node id.
    assert token.tolist() == [[10, 11, 20, 22]] and parent.tolist() == [[-1, -1, 0, 1]]
    # A child as likely as its parent (probability 1) never goes in without it.
    scores = [torch.tensor([[-0.1, -0.2]]), torch.tensor([[-0.1, -9.0, -9.0, -9.0]])]
    token, parent = EagleProposer._select(scores, tokens, parents, depth, 1)
    assert token.tolist() == [[10]] and parent.tolist() == [[-1]]


def test_tree_flags_are_checked_at_start(tmp_path):
    def spec(**kw):
        return speculation_params(scheduler_config(**kw))

    path = str(tmp_path)
    base = dict(speculative_algorithm="EAGLE3", speculative_draft_model_path=path)
    assert spec(**base, speculative_eagle_topk=4) == EagleParams("EAGLE3", path, 3, 4, 13)
    params = spec(**base, speculative_eagle_topk=2, speculative_num_steps=5)
    assert params.max_draft_tokens == 10
    with pytest.raises(ValueError, match="holds 1..2 drafts"):
        spec(
            **base,
            speculative_eagle_topk=2,
            speculative_num_steps=1,
            speculative_num_draft_tokens=4,
        )
    with pytest.raises(ValueError, match="STANDALONE draft model drafts a chain"):
        spec(**{**base, "speculative_algorithm": "STANDALONE"}, speculative_eagle_topk=2)
    with pytest.raises(ValueError, match="--page-size 1"):
        spec(**base, speculative_eagle_topk=2, page_size=4)
