"""The triton backend runs a speculative verify step's tokens as decode rows (verify_as_decode_rows):
token i of a request with prefix P is one decode row over the request's table row with length P + i + 1,
so no extend kernel runs and on the GPU a verify step replays the decode CUDA graphs. On the CPU the
kernels run in the Triton interpreter, float32 tiny random Llama."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # the triton backend's kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.common.step import ContinuingRequest, StepInput
from radixserve.executor.attention import triton_backend
from tests.executor.test_kv_cache_fp8 import greedy, make_runner
from tests.executor.tiny_llama import new

PROMPT = [5, 17, 33, 9, 101, 64, 12, 7, 90, 3, 44, 21]
N = len(PROMPT)


def triton_runner(model_dir):
    return make_runner(model_dir, dtype="float32", attention_backend="triton")


@pytest.fixture(scope="module")
def plain(model_dir):
    """Greedy prefill + 5 decode steps, one token per step: the logits each verify row must give."""
    return greedy(triton_runner(model_dir), PROMPT, 5)


def verify(runner, drafts: list[int], rid="a", step_id=2):
    slots = list(range(N + 1, N + 2 + len(drafts)))
    return runner.step(
        StepInput(step_id, continuing_requests=[ContinuingRequest(rid, slots, draft_ids=drafts)])
    )


@pytest.fixture()
def no_extend_kernel(monkeypatch):
    """Fail if the extend attention kernel runs (a verify step must not need it)."""

    def refuse(*args, **kwargs):
        raise AssertionError("extend attention ran for a verify step")

    def arm():
        monkeypatch.setattr(triton_backend, "extend_attention", refuse)

    return arm


def test_all_accepted_rows_are_the_decode_steps_rows(model_dir, plain, no_extend_kernel):
    logits, tokens = plain
    runner = triton_runner(model_dir)
    runner.step(StepInput(1, new_requests=[new("a", PROMPT, list(range(1, N + 1)))]))
    no_extend_kernel()
    out = verify(runner, tokens[1:5])
    assert out.outputs[0].accepted_draft_ids == tokens[1:5]
    assert out.outputs[0].token_id == tokens[5]
    assert out.logits.shape[0] == 5
    # logits[0] is the prefill's; verify row j is decode step j + 1's.
    torch.testing.assert_close(out.logits.float(), logits[1:6], rtol=1e-4, atol=1e-4)


def test_rejected_drafts_leave_the_sequence_as_plain_decoding_would(model_dir, plain):
    logits, tokens = plain
    runner = triton_runner(model_dir)
    runner.step(StepInput(1, new_requests=[new("a", PROMPT, list(range(1, N + 1)))]))
    wrong = (tokens[2] + 1) % 128
    out = verify(runner, [tokens[1], wrong, tokens[3]])
    assert out.outputs[0].accepted_draft_ids == [tokens[1]]
    assert out.outputs[0].token_id == tokens[2]
    # The rejected drafts' slots are the scheduler's again: the next token reuses one of them.
    for i, slot in enumerate((N + 3, N + 4, N + 5)):
        out = runner.step(StepInput(3 + i, continuing_requests=[ContinuingRequest("a", [slot])]))
        assert out.outputs[0].token_id == tokens[3 + i]
        torch.testing.assert_close(out.logits[0].float(), logits[3 + i], rtol=1e-4, atol=1e-4)


def test_a_verify_beside_a_prefill_and_a_decode(model_dir, plain):
    """One step with a new prompt (extend), a verify request (rows) and a plain decode request."""
    logits, tokens = plain
    runner = triton_runner(model_dir)
    runner.step(
        StepInput(
            1,
            new_requests=[
                new("a", PROMPT, list(range(1, N + 1))),
                new("b", PROMPT, list(range(101, 101 + N))),
            ],
        )
    )
    out = runner.step(
        StepInput(
            2,
            new_requests=[new("c", PROMPT, list(range(201, 201 + N)))],
            continuing_requests=[
                ContinuingRequest("a", list(range(N + 1, N + 4)), draft_ids=tokens[1:3]),
                ContinuingRequest("b", [101 + N]),
            ],
        )
    )
    by_id = {o.request_id: o for o in out.outputs}
    assert by_id["a"].accepted_draft_ids == tokens[1:3] and by_id["a"].token_id == tokens[3]
    assert by_id["b"].token_id == tokens[1]
    assert by_id["c"].token_id == tokens[0]


TREE_FLAGS = dict(speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=2)


def tree_of(tokens):
    """A tree draft for the decode steps' tokens: a wrong first child at the root (with the true next
    token under it), then tokens[1], tokens[2], tokens[3] down the second branch. Accepting the
    right path emits tokens[1:4] then tokens[4]; its rows are nodes 1, 3, 4 (rows 2, 4, 5)."""
    wrong = (tokens[1] + 1) % 128
    return [wrong, tokens[1], tokens[2], tokens[2], tokens[3]], [-1, -1, 0, 1, 3]


def verify_tree(runner, tokens, step_id=2):
    ids, parents = tree_of(tokens)
    slots = list(range(N + 1, N + 2 + len(ids)))
    step = ContinuingRequest("a", slots, draft_ids=ids, draft_parents=parents)
    return runner.step(StepInput(step_id, continuing_requests=[step]))


def test_tree_rows_are_the_decode_steps_rows(model_dir, plain, no_extend_kernel):
    """Each tree node attends to the prefix and its own ancestors only: the accepted path's rows
    equal plain decoding's, and the sequence goes on from the path's slots (the rejected ones, reused
    at once, would corrupt it otherwise)."""
    logits, tokens = plain
    runner = make_runner(model_dir, dtype="float32", attention_backend="triton", **TREE_FLAGS)
    runner.step(StepInput(1, new_requests=[new("a", PROMPT, list(range(1, N + 1)))]))
    no_extend_kernel()
    out = verify_tree(runner, tokens)
    assert out.outputs[0].accepted_draft_ids == tokens[1:4]
    assert out.outputs[0].token_id == tokens[4]
    assert out.logits.shape[0] == 6
    torch.testing.assert_close(out.logits[[0, 2, 4, 5]].float(), logits[1:5], rtol=1e-4, atol=1e-4)
    # The wrong branch's slots (N + 2, N + 4) are free again: the next decode writes one.
    out = runner.step(StepInput(3, continuing_requests=[ContinuingRequest("a", [N + 2])]))
    assert out.outputs[0].token_id == tokens[5]
    torch.testing.assert_close(out.logits[0].float(), logits[5], rtol=1e-4, atol=1e-4)


def cuda_runner(model_dir, graphs: bool, **flags):
    from radixserve.executor.runner import ModelRunner
    from tests.configs import runner_config

    graph_flags = {"cuda_graph_max_bs": 16} if graphs else {}
    config = runner_config(
        dtype="float32",
        device="cuda",
        load_format="dummy",
        random_seed=0,
        max_total_tokens=400,
        **graph_flags,
        **flags,
    )
    runner = ModelRunner(model_dir, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in runner.model.parameters():
            if p.dim() == 2:
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p.device, p.dtype))
    return runner


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_verify_steps_replay_the_decode_graphs(model_dir):
    """On the GPU with CUDA graphs: a verify step's rows come from a graph replay and equal eager decode rows."""
    logits, tokens = greedy(cuda_runner(model_dir, False), PROMPT, 5)
    runner = cuda_runner(model_dir, True)
    assert runner.cuda_graphs is not None
    replays = []
    real_replay = runner.cuda_graphs.replay
    runner.cuda_graphs.replay = lambda batch: replays.append(batch.num_tokens) or real_replay(batch)
    runner.step(StepInput(1, new_requests=[new("a", PROMPT, list(range(1, N + 1)))]))
    out = verify(runner, tokens[1:5])
    assert replays == [5]
    assert out.outputs[0].accepted_draft_ids == tokens[1:5]
    torch.testing.assert_close(out.logits.float(), logits[1:6], rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_standalone_drafts_keep_the_target_graphs(model_dir):
    """STANDALONE reads token ids, not hidden states: the target keeps its CUDA graphs (verify steps
    replay them) and greedy outputs equal plain decoding's."""
    from tests.spec_serving import greedy as greedy_sampling
    from tests.spec_serving import make_scheduler, run

    requests = [(f"r{i}", PROMPT[i:], 24, greedy_sampling(), {}) for i in range(3)]
    plain = cuda_runner(model_dir, True)
    ref, _, _ = run(plain, make_scheduler(plain), requests)
    flags = dict(
        speculative_algorithm="STANDALONE",
        speculative_draft_model_path=str(model_dir),
        speculative_num_steps=3,
    )
    runner = cuda_runner(model_dir, True, **flags)
    assert runner.cuda_graphs is not None
    replayed = []
    real_replay = runner.cuda_graphs.replay
    runner.cuda_graphs.replay = lambda batch: (
        replayed.append(batch.num_tokens) or real_replay(batch)
    )
    info = runner.model_info()
    sched = make_scheduler(runner, info.max_graph_tokens, **flags)
    tokens, _, _ = run(runner, sched, requests)
    assert tokens == ref
    assert sched.spec_stats.verify_steps > 0 and max(replayed) > 3  # verify rows in a graph


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tree_verify_steps_replay_the_decode_graphs(model_dir):
    """A tree's nodes are decode rows on spare table rows: a graph replays them, and the accepted
    path's rows equal eager decoding's."""
    logits, tokens = greedy(cuda_runner(model_dir, False), PROMPT, 6)
    runner = cuda_runner(model_dir, True, **TREE_FLAGS)
    replays = []
    real_replay = runner.cuda_graphs.replay
    runner.cuda_graphs.replay = lambda batch: replays.append(batch.num_tokens) or real_replay(batch)
    runner.step(StepInput(1, new_requests=[new("a", PROMPT, list(range(1, N + 1)))]))
    out = verify_tree(runner, tokens)
    assert replays == [6]
    assert out.outputs[0].accepted_draft_ids == tokens[1:4]
    torch.testing.assert_close(out.logits[[0, 2, 4, 5]].float(), logits[1:5], rtol=1e-3, atol=1e-3)
    out = runner.step(StepInput(3, continuing_requests=[ContinuingRequest("a", [N + 2])]))
    assert out.outputs[0].token_id == tokens[5]
