"""EAGLE / EAGLE3 / STANDALONE speculative decoding end to end in one process: the scheduler core plans
the steps, a real ModelRunner (a tiny random HF Llama target, CPU, float32) loads a draft head saved in
the published layout (or a whole small draft model: STANDALONE), proposes drafts after every step and
verifies them the step after.

Covers: greedy outputs with EAGLE, EAGLE3 and STANDALONE equal plain decoding's, token for token, with
chunked prefill; every proposal equals the draft run from scratch over the whole sequence (the draft
K/V kept step by step, chunk by chunk, is right); a head built to reproduce its target, and the target
as its own STANDALONE draft, get every draft accepted (K + 1 tokens per verify step); random traffic
with overlap, chunked prefill, pages, mixed steps and aborts leaves the KV pool whole; the flags and
the draft are checked at start.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from radixserve.common.args import FlagError, check_speculation
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import SampledToken, StepOutput
from radixserve.common.step_convert import output_from_proto, output_to_proto
from radixserve.executor.attention.torch_native import TorchNativeAttentionBackend
from radixserve.executor.eagle_proposer import DraftRequest, EagleProposer
from radixserve.executor.runner import ModelRunner
from radixserve.scheduler.core import Scheduler
from radixserve.scheduler.speculation import EagleParams, speculation_params
from tests.configs import scheduler_config
from tests.executor.tiny_llama import cpu_runner
from tests.executor.test_eagle_draft import (
    HIDDEN,
    VOCAB,
    draft_config,
    eagle3_tensors,
    run_target,
    save_draft,
    save_target,
    save_target_and_heads,
)
from tests.spec_serving import (
    add_requests,
    assert_greedy_outputs_match,
    assert_same_outputs,
    greedy,
    run,
    run_overlapped,
)
from tests.spec_serving import make_scheduler as plain_scheduler

POOL = 600
K = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 4-layer random target, a random EAGLE head, a random EAGLE3 head and a 2-layer STANDALONE
    draft model (the target perturbed: it agrees with the target on some tokens, not all)."""
    root = tmp_path_factory.mktemp("eagle_serving")
    save_target_and_heads(root)
    save_target(root / "STANDALONE", layers=4, edit=perturb)
    return root


def eagle_flags(algorithm=None, head=None) -> dict:
    """The flags that turn algorithm on with the draft head in head (none: plain decoding)."""
    if algorithm is None:
        return {}
    return dict(
        speculative_algorithm=algorithm,
        speculative_draft_model_path=str(head),
        speculative_num_steps=K,
    )


def perturb(hf):
    g = torch.Generator().manual_seed(7)
    for p in hf.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)


def make_runner(target, algorithm=None, head=None, **config) -> ModelRunner:
    return cpu_runner(target, POOL, **eagle_flags(algorithm, head), **config)


def make_scheduler(runner, algorithm=None, head=None, **config) -> Scheduler:
    return plain_scheduler(runner, **eagle_flags(algorithm, head), **config)


def prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 30))] for _ in range(n)]


REQUESTS = [
    (f"r{i}", p, 12 + 3 * i, greedy(return_logprob=i % 2 == 0), {})
    for i, p in enumerate(prompts(0, 5))
]
CHUNKED = dict(chunked_prefill_size=8)


@pytest.fixture(scope="module")
def reference(folders):
    runner = make_runner(folders / "target")
    return run(runner, make_scheduler(runner, **CHUNKED), REQUESTS)


@pytest.mark.parametrize("algorithm", ["EAGLE", "EAGLE3", "STANDALONE"])
def test_greedy_eagle_equals_plain_decoding_token_for_token(folders, reference, algorithm):
    head = folders / algorithm
    runner = make_runner(folders / "target", algorithm, head)
    assert runner.eagle is not None and runner.fast_decode is None
    sched = make_scheduler(runner, algorithm, head, **CHUNKED)
    assert_same_outputs(run(runner, sched, REQUESTS), reference)
    stats = sched.spec_stats
    # Every decode after the first token verifies the executor's K drafts (fewer near the end).
    assert stats.verify_steps > 0 and stats.draft_tokens > stats.verify_steps
    assert stats.draft_tokens <= K * stats.verify_steps
    if algorithm == "STANDALONE":  # a draft model near the target's: some drafts right, not all
        assert 0 < stats.accepted_tokens < stats.draft_tokens


def serve_recording(runner, sched, requests, cached=None):
    """Serve requests (serially) and record, after each step, every live request's sequence and
    the drafts the executor proposed after it; cached: {request id: prompt tokens from the cache}."""
    add_requests(sched, requests)
    seen = []
    while (plan := sched.schedule()) is not None:
        out = runner.step(plan)
        live = {o.request_id: sched.requests[o.request_id] for o in out.outputs}
        events = sched.update(plan, out.outputs, out.prompt_logprobs)
        done = {e.request_id for e in events if e.finished}
        if cached is not None:
            cached.update({e.request_id: e.cached_tokens for e in events if e.finished})
        for o in out.outputs:
            if o.request_id not in done:
                seen.append((list(live[o.request_id].seq), o.proposed_draft_ids))
        assert sched.check_leak(deep=True) is None
    return seen


@pytest.mark.parametrize(
    "algorithm,radix",
    [("EAGLE", False), ("EAGLE3", False), ("STANDALONE", False), ("STANDALONE", True)],
)
def test_proposals_equal_the_head_run_over_the_whole_sequence(folders, algorithm, radix):
    """The draft K/V kept across chunks and verify steps is what a fresh run writes: each proposal
    equals the draft's chain over the whole sequence from scratch. A head runs without the radix
    cache (a prefix hit reuses draft K/V computed with another request's next token, an
    approximation); a STANDALONE draft's K/V at a slot depends on that position's own token only, so
    it stays exact across prefix hits (radix: later requests extend earlier ones' prompts)."""
    head = folders / algorithm
    runner = make_runner(folders / "target", algorithm, head)
    sched = make_scheduler(runner, algorithm, head, disable_radix_cache=not radix, **CHUNKED)
    seen = serve_recording(runner, sched, REQUESTS[:3])
    assert len(seen) > 10
    if radix:
        again = [
            (f"{rid}-again", prompt + [7, 8, 9], 8, greedy(), {})
            for rid, prompt, _, _, _ in REQUESTS[:3]
        ]
        cached = {}
        seen += serve_recording(runner, sched, again, cached)
        assert all(cached[rid] > 0 for rid, *_ in again), cached
    fresh = EagleProposer(
        runner.eagle.head,
        200,
        1,
        K,
        TorchNativeAttentionBackend(),
        torch.device("cpu"),
        torch.float32,
    )
    table = torch.zeros(1, 128, dtype=torch.int64)
    for seq, proposed in seen:
        n = len(seq) - 1  # the last token has no KV yet
        slots = list(range(1, n + 1))
        table[0, :n] = torch.tensor(slots)
        request = DraftRequest(0, 0, seq[1:], slots)
        if algorithm == "STANDALONE":  # the model's own tokens: seq[0] at 0, then seq[1:]
            expected = fresh.propose(table, [request], None, K, None, torch.tensor([seq[0]]))
        else:
            out, captured = run_target(runner.model, seq[:n])
            hidden = captured if algorithm == "EAGLE3" else out
            expected = fresh.propose(table, [request], hidden, K)
        assert proposed == expected[0].tolist(), len(seq)


def reproducing_head(root):
    """A 1-layer target without attention (o_proj 0) and with a unit final norm, and an EAGLE head
    that passes the next token's embedding through its layer, the target's: it predicts the
    target's next hidden state exactly (test_eagle_draft.py's construction)."""

    def edit(hf):
        hf.model.layers[0].self_attn.o_proj.weight.zero_()
        hf.model.norm.weight.fill_(1.0)

    hf, _ = save_target(root / "target", layers=1, edit=edit)
    weights = {
        "fc.weight": torch.cat((torch.eye(HIDDEN), torch.zeros(HIDDEN, HIDDEN)), 1),
        "fc.bias": torch.zeros(HIDDEN),
    }
    for name, value in hf.state_dict().items():
        if name.startswith("model.layers.0.") and "input_layernorm" not in name:
            weights[name.removeprefix("model.")] = value.detach().clone()
    save_draft(
        root / "head",
        draft_config(architectures=["LlamaForCausalLM"], num_hidden_layers=1),
        weights,
    )
    return root / "target", root / "head"


def test_head_reproducing_the_target_gets_every_draft_accepted(tmp_path):
    target, head = reproducing_head(tmp_path)
    requests = [(f"q{i}", p, 20, greedy(), {}) for i, p in enumerate(prompts(1, 3))]
    runner = make_runner(target)
    ref, _, _ = run(runner, make_scheduler(runner, **CHUNKED), requests)
    runner = make_runner(target, "EAGLE", head)
    sched = make_scheduler(runner, "EAGLE", head, **CHUNKED)
    tokens, _, _ = run(runner, sched, requests)
    assert tokens == ref
    stats = sched.spec_stats
    assert stats.accepted_tokens == stats.draft_tokens > 0
    # 20 tokens: the prefill's first, then 19 by verify steps of K + 1 = 4 (the last one short).
    assert stats.verify_steps == 3 * 5
    assert stats.accepted_tokens == 3 * (4 * K + 2)


def test_the_target_as_its_own_standalone_draft_gets_every_draft_accepted(folders):
    """STANDALONE with the target's own folder: a draft that is always right (K + 1 tokens per
    verify step), so every draft position reads the right token at the right position and slot."""
    target = folders / "target"
    requests = [(f"q{i}", p, 20, greedy(), {}) for i, p in enumerate(prompts(1, 3))]
    runner = make_runner(target)
    ref, _, _ = run(runner, make_scheduler(runner, **CHUNKED), requests)
    runner = make_runner(target, "STANDALONE", target)
    assert runner.eagle.head.algorithm == "STANDALONE"
    sched = make_scheduler(runner, "STANDALONE", target, **CHUNKED)
    tokens, _, _ = run(runner, sched, requests)
    assert tokens == ref
    stats = sched.spec_stats
    assert stats.accepted_tokens == stats.draft_tokens > 0
    assert stats.verify_steps == 3 * 5
    assert stats.accepted_tokens == 3 * (4 * K + 2)


@pytest.mark.parametrize(
    "page_size,mixed,algorithm",
    [(1, False, "EAGLE3"), (4, True, "EAGLE3"), (4, True, "STANDALONE")],
)
def test_random_traffic_with_eagle_leaves_the_pool_whole(folders, page_size, mixed, algorithm):
    rng = random.Random(page_size)
    requests = []
    for i, prompt in enumerate(prompts(10 + page_size, 14)):
        kind = rng.random()
        if kind < 0.2:
            sampling = SamplingParams(temperature=0.8, seed=i)
        elif kind < 0.3:
            sampling = greedy(repetition_penalty=1.2)
        else:
            sampling = greedy(return_logprob=kind < 0.5)
        requests.append((f"r{i}", prompt, rng.randint(1, 20), sampling, {}))
    config = dict(page_size=page_size, chunked_prefill_size=8, enable_mixed_chunk=mixed)
    runner = make_runner(folders / "target")
    ref, _, _ = run(runner, make_scheduler(runner, **config), requests)
    head = folders / algorithm
    runner = make_runner(folders / "target", algorithm, head)
    sched = make_scheduler(runner, algorithm, head, **config)
    arrivals = {}
    for req in requests:
        arrivals.setdefault(rng.randrange(30), []).append(req)
    tokens, aborted = run_overlapped(runner, sched, arrivals, rng)
    assert_greedy_outputs_match(requests, tokens, aborted, ref)
    assert sched.spec_stats.verify_steps > 0


def test_flags_make_the_eagle_settings(tmp_path):
    def spec(**kw):
        return speculation_params(scheduler_config(**kw))

    path = str(tmp_path)
    assert spec(speculative_algorithm="EAGLE", speculative_draft_model_path=path) == EagleParams(
        "EAGLE", path, 3
    )
    assert spec(
        speculative_algorithm="EAGLE3",
        speculative_draft_model_path=path,
        speculative_num_draft_tokens=6,
        speculative_eagle_topk=1,
    ) == EagleParams("EAGLE3", path, 5)
    assert spec(
        speculative_algorithm="STANDALONE",
        speculative_draft_model_path=path,
        speculative_num_draft_tokens=5,
    ) == EagleParams("STANDALONE", path, 4)
    assert spec(
        speculative_algorithm="STANDALONE", speculative_draft_model_path=path
    ) == EagleParams("STANDALONE", path, 3)
    for bad, message in (
        ({}, "needs --speculative-draft-model-path"),
        ({"speculative_draft_model_path": path, "speculative_num_steps": 0}, "at least 1"),
        (
            {
                "speculative_draft_model_path": path,
                "speculative_num_steps": 3,
                "speculative_num_draft_tokens": 8,
            },
            "num-steps \\+ 1",
        ),
    ):
        for algorithm in ("EAGLE", "STANDALONE"):
            with pytest.raises(FlagError, match=message):
                check_speculation(scheduler_config(speculative_algorithm=algorithm, **bad))
    # Trees (topk > 1) are a head's (test_eagle_tree.py); a STANDALONE draft model drafts chains.
    with pytest.raises(FlagError, match="drafts a chain \\(topk 1\\)"):
        check_speculation(
            scheduler_config(
                speculative_algorithm="STANDALONE",
                speculative_draft_model_path=path,
                speculative_eagle_topk=4,
            )
        )


def test_command_line_refuses_what_is_not_built(capsys):
    from radixserve.cli import main

    for argv, message in (
        (["--speculative-algorithm", "NEXTN"], "NEXTN's MTP heads"),
        (["--speculative-algorithm", "EAGLE"], "needs --speculative-draft-model-path"),
        (
            ["--speculative-algorithm", "STANDALONE"],
            "needs --speculative-draft-model-path (the draft model's folder)",
        ),
        (
            ["--speculative-algorithm", "STANDALONE", "--speculative-draft-model", "x"]
            + ["--speculative-eagle-topk", "2"],
            "a STANDALONE draft model drafts a chain (topk 1)",
        ),
        (
            ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model", "x"]
            + ["--speculative-eagle-topk", "8", "--speculative-num-draft-tokens", "100"],
            "the tree holds 1..64 drafts",
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "--model-path", "m", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_executor_refuses_a_head_it_cannot_load(folders, tmp_path):
    with pytest.raises(FileNotFoundError):
        make_runner(folders / "target", "EAGLE", tmp_path / "missing")
    # An EAGLE3 head of another vocabulary than the target's.
    (tmp_path / "other").mkdir()
    save_draft(
        tmp_path / "other",
        draft_config(
            architectures=["LlamaForCausalLMEagle3"], num_hidden_layers=1, vocab_size=VOCAB + 1
        ),
        eagle3_tensors(),
    )
    with pytest.raises(ValueError, match="vocabulary"):
        make_runner(folders / "target", "EAGLE3", tmp_path / "other")


def test_executor_refuses_a_standalone_draft_it_cannot_serve(folders, tmp_path):
    with pytest.raises(FileNotFoundError):
        make_runner(folders / "target", "STANDALONE", tmp_path / "missing")
    # A causal LM of another vocabulary: another tokenizer.
    config = json.loads((folders / "STANDALONE" / "config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB + 8}))
    message = f"STANDALONE draft model vocabulary {VOCAB + 8} != the target's {VOCAB}"
    with pytest.raises(ValueError, match=message):
        make_runner(folders / "target", "STANDALONE", tmp_path / "other")
    # Not of the Llama family (refused before any weight is read: the folder has none).
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text(
        json.dumps({**config, "architectures": ["Qwen3MoeForCausalLM"]})
    )
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM is not one"):
        make_runner(folders / "target", "STANDALONE", tmp_path / "moe")


def test_proposed_draft_ids_cross_the_contract():
    out = StepOutput(
        3, [SampledToken("a", 5, proposed_draft_ids=[7, 8, 9]), SampledToken("b", 1)], 1.0
    )
    back = output_from_proto(output_to_proto(out))
    assert [o.proposed_draft_ids for o in back.outputs] == [[7, 8, 9], []]


def test_a_target_without_the_llama_forward_is_refused(folders):
    from radixserve.executor.eagle_step import EagleStep

    class OwnForward(torch.nn.Module):  # e.g. Gemma's: no hidden-state capture
        pass

    params = EagleParams("EAGLE3", str(folders / "EAGLE3"), K)
    with pytest.raises(ValueError, match="Llama family's forward; OwnForward has its own"):
        EagleStep(params, OwnForward(), torch.device("cpu"), torch.float32)
