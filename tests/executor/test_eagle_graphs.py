"""EAGLE / EAGLE3 with the target's decode CUDA graphs (cuda_graph_runner.py, keep_hidden): the graphs
keep the hidden rows the head reads (the final hidden states; EAGLE3's captured layer inputs) and a
replay hands the step's rows to the head as the eager forward does, so decode and verify steps replay;
the head's rounds 2..K replay graphs of their own (eagle_graphs.py, DraftRoundGraphs).

On the CPU (the triton backend's kernels in the interpreter) a stand-in graph (EagerGraph) replays a
bucket by rerunning its forward over the static buffers into the captured output tensors, attributes
left as a real replay leaves them (model.captured_hidden is not refreshed); the runner, the scheduler
and the head are the real ones. Served greedy traffic with the stand-in graphs gives, step by step, the
graph-less run's tokens, accepted drafts and proposals (proposals read the hidden rows: a wrong row,
order or padding row changes them), and plain decoding's tokens; every decode and verify step is a
replay, and so are every propose call's rounds 2..K (a propose call with them leaves the eager rounds'
drafts and draft K/V). The cuda tests check the same with real CUDA graphs (`-m cuda` on a GPU).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend's kernels, on the CPU

from radixserve.executor.attention.metadata import forward_context
from radixserve.executor.attention.registry import create_attention_backend
from radixserve.executor.cuda_graph_runner import CudaGraphRunner, GraphOutputs
from radixserve.executor.eagle_graphs import DraftRoundGraphs
from radixserve.executor.eagle_proposer import DraftRequest, EagleProposer
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.eagle import load_draft_model
from radixserve.executor.runner import ModelRunner, load_model
from tests.configs import runner_config
from tests.executor.test_eagle_draft import (
    HIDDEN,
    VOCAB,
    save_target_and_heads,
)
from tests.executor.test_eagle_serving import (
    CHUNKED,
    K,
    POOL,
    eagle_flags,
    prompts,
    reproducing_head,
)
from tests.spec_serving import add_requests, greedy, make_scheduler

GRAPH_BS = 16  # 3 requests' verify rows (1 + K each) fit: no draft is trimmed
NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
REQUESTS = [(f"r{i}", p, 6 + 2 * i, greedy(), {}) for i, p in enumerate(prompts(3, 3))]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 4-layer random target, a random EAGLE head and a random EAGLE3 head (test_eagle_draft.py's)."""
    root = tmp_path_factory.mktemp("eagle_graphs")
    save_target_and_heads(root)
    return root


class EagerGraph:
    """A CUDA graph's stand-in on the CPU: replay reruns the bucket's forward over its static input
    buffers and copies the results into the captured output tensors. Like a real replay it runs no
    Python in the model: the target's captured_hidden keeps what it was."""

    def __init__(self, graphs, batch, outputs):
        self.graphs, self.batch, self.outputs = graphs, batch, outputs

    def replay(self) -> None:
        model = getattr(self.graphs, "model", None)  # the target's (not the draft rounds')
        before = getattr(model, "captured_hidden", None)
        with forward_context(self.batch):
            fresh = self.graphs._run(self.batch)
        if model is not None:
            model.captured_hidden = before
        for f in dataclasses.fields(self.outputs):
            static, new = getattr(self.outputs, f.name), getattr(fresh, f.name)
            assert (static is None) == (new is None), f.name
            if static is not None:
                static.copy_(new)


class EagerRecording:
    """Records EagerGraph for torch.cuda.CUDAGraph; the graph runner's buffers, padding, outputs."""

    def _graph_pool(self):
        return None

    def _record(self, batch, pool):
        outputs = self._run(batch)
        return EagerGraph(self, batch, outputs), outputs


class EagerGraphRunner(EagerRecording, CudaGraphRunner):
    pass


class EagerDraftRounds(EagerRecording, DraftRoundGraphs):
    pass


def make_runner(
    target, algorithm=None, head=None, device="cpu", graphs=True, graph_bs=GRAPH_BS, **extra
) -> ModelRunner:
    """A float32 runner of target (triton attention) with algorithm's head; with graphs: real CUDA
    graphs on a GPU, the stand-in ones on the CPU (up to graph_bs rows; each bucket's capture runs a
    forward, seconds in the Triton interpreter); extra: more flags (trees: topk)."""
    flags = {"cuda_graph_max_bs": graph_bs} if graphs and device == "cuda" else {}
    runner = ModelRunner(
        target,
        runner_config(
            dtype="float32",
            device=device,
            random_seed=0,
            max_total_tokens=POOL,
            attention_backend="triton",
            **flags,
            **eagle_flags(algorithm, head),
            **extra,
        ),
    )
    if graphs and device == "cpu":
        runner.cuda_graphs = runner.graph_runner(EagerGraphRunner, graph_bs)
        if runner.eagle is not None:
            width = runner.slot_table.tensor.shape[1]
            runner.eagle.capture_rounds(EagerDraftRounds, graph_bs, width)
    assert (runner.cuda_graphs is not None) == graphs
    return runner


class Recorder:
    """Counts the runner's steps: the batches built, those a graph replayed, eager target forwards."""

    def __init__(self, runner: ModelRunner):
        self.batches, self.replayed, self.eager_forwards = [], [], 0
        replaying = []  # (the CPU's stand-in graphs rerun the forward: not an eager step)
        build = runner.batch_builder.build

        def recording_build(step, states):
            batch = build(step, states)
            self.batches.append(batch)
            return batch

        runner.batch_builder.build = recording_build
        if runner.cuda_graphs is not None:
            replay = runner.cuda_graphs.replay

            def recording_replay(batch):
                self.replayed.append(batch)
                replaying.append(batch)
                try:
                    return replay(batch)
                finally:
                    replaying.pop()

            runner.cuda_graphs.replay = recording_replay
        forward = runner.model.forward

        def counting_forward(*args, **kwargs):
            self.eager_forwards += not replaying
            return forward(*args, **kwargs)

        runner.model.forward = counting_forward
        # The head: every propose call runs round 1 eagerly, rounds 2..K from the round graphs.
        self.proposals = self.eager_rounds = self.graph_rounds = 0
        proposer = runner.eagle.proposer if runner.eagle is not None else None
        if proposer is not None and proposer.round_graphs is not None:
            propose, run, rounds = proposer.propose, proposer._run, proposer.round_graphs.rounds

            def counting_propose(*args, **kwargs):
                self.proposals += 1
                return propose(*args, **kwargs)

            def counting_run(*args, **kwargs):
                self.eager_rounds += 1
                return run(*args, **kwargs)

            def counting_rounds(*args, **kwargs):
                drafts = rounds(*args, **kwargs)
                self.graph_rounds += len(drafts)
                return drafts

            proposer.propose, proposer._run = counting_propose, counting_run
            proposer.round_graphs.rounds = counting_rounds

    def check_decode_steps_replayed(self) -> None:
        decodes = [b for b in self.batches if b.num_extend_tokens == 0]
        assert [id(b) for b in self.replayed] == [id(b) for b in decodes]
        assert self.eager_forwards == len(self.batches) - len(decodes)
        verifies = [b for b in self.replayed if b.samples is not None and b.samples.num_drafts]
        assert any(b.num_tokens > len(b.samples.request_ids) for b in verifies)  # drafts as rows
        assert self.graph_rounds > 0 and self.eager_rounds == self.proposals  # round 1 alone


def serve(runner, sched, requests):
    """Serve requests to the end: (each request's tokens, the trace: per step, per output, the
    drafts it verified, its token, the accepted drafts and the drafts proposed after it)."""
    add_requests(sched, requests)
    tokens, trace = {}, []
    while (plan := sched.schedule()) is not None:
        sent = {r.request_id: list(r.draft_ids) for r in plan.continuing_requests}
        out = runner.step(plan)
        trace.append(
            sorted(
                (
                    o.request_id,
                    sent.get(o.request_id, []),
                    o.token_id,
                    o.accepted_draft_ids,
                    o.proposed_draft_ids,
                )
                for o in out.outputs
            )
        )
        for ev in sched.update(plan, out.outputs, out.prompt_logprobs):
            tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
        assert sched.check_leak(deep=True) is None
    assert not sched.has_work()
    return tokens, trace


def scheduler(runner, algorithm=None, head=None, **extra):
    """The scheduler core; told of GRAPH_BS-row graphs with or without them (the same plans)."""
    graph_rows = runner.model_info().max_graph_tokens
    assert graph_rows in (0, GRAPH_BS)
    return make_scheduler(runner, GRAPH_BS, **eagle_flags(algorithm, head), **CHUNKED, **extra)


_plain: dict = {}


def plain_tokens(target, device: str, requests) -> dict:
    """Plain decoding's tokens (graphs off), computed once per target, device and requests."""
    key = (str(target), device, repr(requests))
    if key not in _plain:
        plain = make_runner(target, device=device, graphs=False)
        _plain[key] = serve(plain, scheduler(plain), requests)[0]
    return _plain[key]


def check_graphs_keep_the_eager_steps(folders, algorithm, device, requests=REQUESTS):
    """Plain decoding, the head without graphs and the head with graphs: the same tokens; with and
    without graphs the same trace (accepted drafts, proposals); every decode / verify step replayed."""
    target, head = folders / "target", folders / algorithm
    ref = plain_tokens(target, device, requests)
    eager = make_runner(target, algorithm, head, device=device, graphs=False)
    eager_sched = scheduler(eager, algorithm, head)
    eager_tokens, eager_trace = serve(eager, eager_sched, requests)
    graphs = make_runner(target, algorithm, head, device=device)
    assert graphs.cuda_graphs.keep_hidden
    recorder = Recorder(graphs)
    sched = scheduler(graphs, algorithm, head)
    tokens, trace = serve(graphs, sched, requests)
    assert eager_tokens == ref and tokens == ref
    assert trace == eager_trace  # accepted drafts and proposals, step by step
    assert any(proposed for step in trace for *_, proposed in step)
    assert sched.spec_stats == eager_sched.spec_stats and sched.spec_stats.verify_steps > 0
    recorder.check_decode_steps_replayed()
    return sched.spec_stats


@pytest.mark.parametrize("algorithm", ["EAGLE", "EAGLE3"])
def test_heads_with_graphs_serve_as_without(folders, algorithm):
    check_graphs_keep_the_eager_steps(folders, algorithm, "cpu")


def test_a_replay_hands_over_the_steps_rows_as_the_eager_forward():
    """live(bs): each kept output's first bs rows (the step's, in order), views of the buffers."""
    out = GraphOutputs(torch.randn(8, 5), torch.randn(8, 3), torch.randn(8, 6))
    live = out.live(3)
    assert [t.shape[0] for t in (live.logits, live.hidden, live.captured)] == [3, 3, 3]
    for got, full in (
        (live.logits, out.logits),
        (live.hidden, out.hidden),
        (live.captured, out.captured),
    ):
        assert torch.equal(got, full[:3]) and got.data_ptr() == full.data_ptr()
    only_logits = GraphOutputs(torch.randn(4, 5)).live(2)
    assert only_logits.hidden is None and only_logits.captured is None


@pytest.mark.parametrize("algorithm", [None, "STANDALONE"])
def test_no_hidden_rows_kept_without_a_head(folders, algorithm):
    """Without speculation, or with a STANDALONE draft (token ids only), the graphs keep logits alone."""
    target = folders / "target"
    runner = make_runner(target, algorithm, target if algorithm else None, graph_bs=2)
    assert not runner.cuda_graphs.keep_hidden
    assert runner.eagle is None or runner.eagle.proposer.round_graphs is None  # STANDALONE: eager
    for outputs in runner.cuda_graphs.outputs.values():
        assert outputs.hidden is None and outputs.captured is None


def test_eagle3_graphs_keep_the_captured_layers(folders):
    runner = make_runner(folders / "target", "EAGLE3", folders / "EAGLE3", graph_bs=2)
    hidden = runner.config.get("hidden_size")
    layers = len(runner.eagle.capture)
    for bs, outputs in runner.cuda_graphs.outputs.items():
        assert outputs.hidden.shape == (bs, hidden)
        assert outputs.captured.shape == (bs, layers * hidden)


def test_compiled_decode_keeps_no_hidden_rows():
    with pytest.raises(ValueError, match="keeps no hidden states"):
        CudaGraphRunner(None, None, None, None, 1, torch.device("cpu"), object(), keep_hidden=True)


def random_draft_requests(lengths, width, g, dev):
    """Draft requests of these lengths (random tokens, slots 30 apart) and their hidden rows."""
    requests = [
        DraftRequest(
            i,
            0,
            torch.randint(0, VOCAB, (m,), generator=g).tolist(),
            list(range(1 + 30 * i, 1 + 30 * i + m)),
        )
        for i, m in enumerate(lengths)
    ]
    return requests, torch.randn(sum(lengths), width, generator=g).to(dev)


def eager_and_replayed(proposer, graphs, propose):
    """propose() with the rounds eager, then from graphs, each over a zeroed draft pool: per run,
    (its result, the draft K/V it left)."""
    pool = proposer.kv_pool.k + proposer.kv_pool.v
    results = []
    for rounds in (None, graphs):
        for cache in pool:
            cache.zero_()
        proposer.round_graphs = rounds
        results.append((propose(), [cache.clone() for cache in pool]))
    return results


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NEEDS_GPU])]
)
@pytest.mark.parametrize("algorithm", ["EAGLE", "EAGLE3"])
def test_round_graphs_draft_as_the_eager_rounds(folders, algorithm, device):
    """A propose call with rounds 2..K from the round graphs drafts what the eager rounds do and
    leaves the same draft K/V (every round's, at its scratch slot: right positions, slots and
    lengths), for 1 and 3 requests of different lengths (buckets 1 and 4: a padding row)."""
    dev = torch.device(device)
    target = load_model(ModelConfig.load(folders / "target", "float32"), dev, "auto", None)
    head = load_draft_model(algorithm, folders / algorithm, target, dev)
    backend = create_attention_backend("triton", dev, head.kv_shape[1])
    proposer = EagleProposer(head, 200, 4, K, backend, dev, torch.float32)
    graphs = (EagerDraftRounds if device == "cpu" else DraftRoundGraphs)(
        proposer, 4, 64, torch.float32
    )
    assert graphs.buckets == [1, 2, 4]
    width = HIDDEN * len(getattr(head, "capture_layers", (0,)))
    g = torch.Generator().manual_seed(5)
    table = torch.zeros(4, 64, dtype=torch.int64, device=dev)
    for n in (1, 3):
        lengths = [4 + 3 * i for i in range(n)]
        requests, hidden = random_draft_requests(lengths, width, g, dev)
        (eager, eager_kv), (replayed, replayed_kv) = eager_and_replayed(
            proposer, graphs, lambda: proposer.propose(table, requests, hidden, K)
        )
        assert eager.shape == (n, K) and torch.equal(replayed, eager)
        scratch = slice(200, 200 + n * (K - 1))  # the rounds' slots, past the target's 200
        assert all(cache[scratch].abs().sum() > 0 for cache in eager_kv)
        for got, want in zip(replayed_kv, eager_kv):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NEEDS_GPU])]
)
def test_tree_round_graphs_draft_as_the_eager_rounds(folders, device):
    """A tree proposal (topk 2) with rounds 2..K from the round graphs, each branch a graph row,
    proposes the eager rounds' tree and leaves the same draft K/V at every branch's scratch slot,
    for 1 and 3 requests (2 and 6 branch rows: buckets 2 and 8, padding rows)."""
    dev = torch.device(device)
    target = load_model(ModelConfig.load(folders / "target", "float32"), dev, "auto", None)
    head = load_draft_model("EAGLE3", folders / "EAGLE3", target, dev)
    backend = create_attention_backend("triton", dev, head.kv_shape[1])
    proposer = EagleProposer(head, 200, 4, K, backend, dev, torch.float32, topk=2)
    graphs = (EagerDraftRounds if device == "cpu" else DraftRoundGraphs)(
        proposer, 8, 64, torch.float32
    )
    assert graphs.buckets == [1, 2, 4, 8]
    replays, tree_round = [], graphs.tree_round
    graphs.tree_round = lambda *args: replays.append(args[3].shape[0]) or tree_round(*args)
    width = HIDDEN * len(head.capture_layers)
    g = torch.Generator().manual_seed(6)
    table = torch.zeros(4, 64, dtype=torch.int64, device=dev)
    for n in (1, 3):
        lengths = [5 + 2 * i for i in range(n)]
        requests, hidden = random_draft_requests(lengths, width, g, dev)
        ((tokens, parents), eager_kv), ((got_tokens, got_parents), replayed_kv) = (
            eager_and_replayed(
                proposer, graphs, lambda: proposer.propose_tree(table, requests, hidden, K, 7)
            )
        )
        assert tokens.shape == (n, 7) and torch.equal(got_tokens, tokens)
        assert torch.equal(got_parents, parents)
        assert (parents[:, 1:] != parents[:, :-1] + 1).any()  # a tree, not a chain
        assert replays[-(K - 1) :] == [2 * n] * (K - 1)  # rounds 2..K replayed, a row per branch
        scratch = slice(200, 200 + n * proposer.scratch_per)  # every branch's slots
        for got, want in zip(replayed_kv, eager_kv):
            assert want[scratch].abs().sum() > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- on a GPU: real CUDA graphs ----


@pytest.mark.cuda
@NEEDS_GPU
@pytest.mark.parametrize("algorithm", ["EAGLE", "EAGLE3"])
def test_heads_keep_the_target_cuda_graphs(folders, algorithm):
    check_graphs_keep_the_eager_steps(folders, algorithm, "cuda")


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NEEDS_GPU])]
)
def test_a_head_reproducing_the_target_gets_every_draft_accepted_under_graphs(tmp_path, device):
    """test_eagle_serving.py's exact EAGLE head: with graphs every draft is accepted, as without,
    each verify step's hidden rows (the last token's and the K accepted drafts') from a replay."""
    target, head = reproducing_head(tmp_path)
    requests = [(f"q{i}", p, 20, greedy(), {}) for i, p in enumerate(prompts(1, 3))]
    ref = plain_tokens(target, device, requests)
    runner = make_runner(target, "EAGLE", head, device=device)
    recorder = Recorder(runner)
    sched = scheduler(runner, "EAGLE", head)
    tokens, _ = serve(runner, sched, requests)
    assert tokens == ref
    stats = sched.spec_stats
    assert stats.accepted_tokens == stats.draft_tokens > 0
    # 20 tokens: the prefill's first, then 19 by verify steps of K + 1 = 4 (the last one short).
    assert stats.verify_steps == 3 * 5 and stats.accepted_tokens == 3 * (4 * K + 2)
    recorder.check_decode_steps_replayed()
