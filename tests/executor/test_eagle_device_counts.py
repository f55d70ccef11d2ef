"""EAGLE / EAGLE3 / STANDALONE drafting after a verify step with the accepted counts left on the device
(eagle_proposer.py, eagle_step.py): round 1 runs over every verified position, the draft comes from
the row of the last kept one and rounds 2..K start there, all chosen on the device.

- The proposer, fed a verify step's tokens and counts on the device, drafts exactly what it drafts
  when handed the kept positions on the host (the path before), for one batch mixing 0, some and all
  K drafts accepted, with both attention backends, with the round graphs, for a STANDALONE model; it
  leaves the same draft K/V at the kept positions, so the next step's drafts agree too. The draft
  pools start as NaN: no round reads a slot no round has written (the reverted first version read
  the scratch slots' stale K/V at masked columns of round 1, and its CI run once drafted 0, 0, 0).
- Trees (topk > 1): the tree proposer given the root and as many positions as the tree is deep (the
  verify's tokens, the accepted path's hidden rows, staged slots) proposes what it proposes given the
  accepted path on the host, for paths of 0, 1 and 3 drafts off either branch, and leaves the same
  draft K/V at the path's slots; EagleStep gathers the path's hidden rows on the device.
- The runner's launch never reads an accepted count on the host (a tensor subclass that raises on
  any host read of itself or of anything computed from it, armed from the verify to collect), and
  served greedy traffic still equals plain decoding's. On a GPU (`-m cuda`) the same runs with real
  CUDA graphs under torch.cuda.set_sync_debug_mode("error") around each verify step's launch.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend's kernels, on the CPU

import radixserve.executor.runner as runner_module
from radixserve.executor.attention.registry import create_attention_backend
from radixserve.common.step import ContinuingRequest, StepInput
from radixserve.executor.eagle_proposer import DraftRequest, EagleProposer
from radixserve.executor.spec_verify import DeviceVerify
from radixserve.executor.eagle_step import EagleStep
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.eagle import load_draft_model
from radixserve.executor.models.standalone import load_standalone_draft
from radixserve.executor.runner import load_model
from tests.executor import test_eagle_graphs as graphs
from tests.executor.test_eagle_draft import HIDDEN, VOCAB, save_target, save_target_and_heads
from tests.executor.test_eagle_serving import K, perturb, prompts
from tests.spec_serving import greedy

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
SLOTS = 200


class Unread(torch.Tensor):
    """The accepted counts, which the host may not read while armed: any host read of this tensor or
    of a tensor computed from it (torch hands the subclass on through every op) raises."""

    armed = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if cls.armed and func in HOST_READS:
            raise AssertionError(f"the host read the accepted counts ({func.__name__})")
        return super().__torch_function__(func, types, args, kwargs or {})


_T = torch.Tensor
HOST_READS = {
    _T.tolist,
    _T.item,
    _T.__bool__,
    _T.__int__,
    _T.__index__,
    _T.__float__,
    _T.__len__,
    _T.numpy,
    _T.cpu,
}


@pytest.fixture(autouse=True)
def disarm():
    """Whatever a test leaves armed is disarmed after it."""
    yield
    Unread.armed = False


@pytest.fixture
def armed():
    Unread.armed = True


def test_the_trap_catches_reads_of_derived_tensors(armed):
    """What the other tests lean on: a read of the counts, or of anything computed from them, raises
    (the path before this change read them with .tolist())."""
    counts = torch.tensor([0, 2, 3]).as_subclass(Unread)
    lens = torch.tensor([5, 6, 7]) - counts
    for read in (
        counts.tolist,
        lambda: lens[0].item(),
        lambda: int(lens[1]),
        lambda: bool(lens[2] > 1),
        lambda: list(lens),
        lambda: [0] * 9 + [1][lens[0] :],
    ):
        with pytest.raises(AssertionError, match="read the accepted counts"):
            read()
    Unread.armed = False
    assert lens.tolist() == [5, 4, 4]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 4-layer random target, random EAGLE and EAGLE3 heads, a perturbed copy as a STANDALONE draft."""
    root = tmp_path_factory.mktemp("eagle_device_counts")
    save_target_and_heads(root)
    save_target(root / "STANDALONE", layers=4, edit=perturb)
    return root


def load_draft(folders, algorithm, device):
    target = load_model(ModelConfig.load(folders / "target", "float32"), device, "auto", None)
    if algorithm == "STANDALONE":
        return load_standalone_draft(folders / "STANDALONE", target, device)
    return load_draft_model(algorithm, folders / algorithm, target, device)


def nan_pools(proposer: EagleProposer) -> EagleProposer:
    """The proposer, its draft pool all NaN: what a pool never written may hold (torch.empty), which
    shows wherever a round reads a slot no round has written."""
    for pool in proposer.kv_pool.k + proposer.kv_pool.v:
        pool.fill_(float("nan"))
    return proposer


class Draws:
    """Seeded draws: slot ids (each handed out once, never the padding slot 0) and token ids."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.free = (torch.randperm(SLOTS - 1, generator=self.g) + 1).tolist()

    def take(self, n: int) -> list[int]:
        out = self.free[:n]
        del self.free[:n]
        return out

    def ids(self, n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=self.g).tolist()


@pytest.mark.parametrize(
    "algorithm, backend, round_graphs",
    [
        ("EAGLE", "torch_native", False),
        ("EAGLE3", "torch_native", False),
        ("EAGLE", "triton", True),
        ("EAGLE3", "triton", False),
        ("STANDALONE", "torch_native", False),
        ("STANDALONE", "triton", False),
    ],
)
def test_proposals_after_a_verify_equal_the_host_count_path(
    folders, algorithm, backend, round_graphs
):
    """Three requests verify K drafts each and keep 0, 1 and all K of them. The proposer given all
    K + 1 positions, the verify's tokens and the counts on the device drafts what it drafts given
    each request's kept positions and next tokens on the host, leaves the same draft K/V there, and
    the decode step after it drafts alike on both. With the triton backend the counts are never read
    on the host (Unread); torch_native reads host lengths in rounds 2..K (on the CPU: no sync)."""
    cpu = torch.device("cpu")
    head = load_draft(folders, algorithm, cpu)
    own = getattr(head, "reads_own_token", False)
    width = 0 if own else HIDDEN * len(getattr(head, "capture_layers", ()) or (0,))
    attn = create_attention_backend(backend, cpu, head.kv_shape[1])

    def proposer():
        # Each round's logits compared too where kept (round graphs keep none): a random head's
        # argmax alone may not notice a round at the wrong position.
        p = EagleProposer(head, SLOTS, 4, K, attn, cpu, torch.float32, keep_logits=not round_graphs)
        if round_graphs:
            p.round_graphs = graphs.EagerDraftRounds(p, 4, 64, torch.float32)
        return p

    on_device, on_host = nan_pools(proposer()), nan_pools(proposer())
    draw = Draws(11)
    g, take, ids = draw.g, draw.take, draw.ids

    def rows(n):
        return None if own else torch.randn(n, width, generator=g)

    table = torch.zeros(4, 64, dtype=torch.int64)
    table_rows, accepted = [3, 0, 2], [0, 1, K]
    prompt_ids = [ids(n) for n in (6, 11, 8)]

    def call(p, requests, hidden, last, first):
        first_t = torch.tensor(first) if own else None
        return p.propose(table, requests, hidden, K, torch.tensor(last), first_t)

    # A prefill of each prompt, then its sampled token (first[i] of the next step), the same on both.
    requests, hidden, bonus0 = [], [], ids(3)
    for row, p, b in zip(table_rows, prompt_ids, bonus0):
        slots = take(len(p))
        table[row, : len(p)] = torch.tensor(slots)
        requests.append(DraftRequest(row, 0, p[1:] + [b], slots))
        hidden.append(rows(len(p)))
    hidden = None if own else torch.cat(hidden)
    first = [p[0] for p in prompt_ids]
    before = [call(p, requests, hidden, bonus0, first) for p in (on_device, on_host)]
    assert torch.equal(before[0], before[1])

    # The verify step: K drafts each (positions prefix .. prefix + K), a of them accepted, then the
    # target's token there (bonus1); the verified tokens row is -1 past it.
    drafts, bonus1 = [ids(K) for _ in table_rows], ids(3)
    tokens = torch.full((3, K + 1), -1, dtype=torch.int64)
    device_requests, host_requests, device_hidden, host_hidden, kept_slots = [], [], [], [], []
    for i, (row, p) in enumerate(zip(table_rows, prompt_ids)):
        a, prefix = accepted[i], len(p)
        tokens[i, : a + 1] = torch.tensor(drafts[i][:a] + [bonus1[i]])
        slots = take(K + 1)
        table[row, prefix : prefix + K + 1] = torch.tensor(slots)
        h = rows(K + 1)
        device_requests.append(DraftRequest(row, prefix, [0] * (K + 1), slots, verify_row=i))
        host_requests.append(DraftRequest(row, prefix, drafts[i][:a] + [bonus1[i]], slots[: a + 1]))
        if not own:
            device_hidden.append(h)
            host_hidden.append(h[: a + 1])
        kept_slots += slots[: a + 1]
    counts = torch.tensor(accepted).as_subclass(Unread)
    verified = DeviceVerify(tokens, counts)
    first = bonus0
    Unread.armed = backend == "triton"
    got = on_device.propose(
        table,
        device_requests,
        None if own else torch.cat(device_hidden),
        K,
        torch.tensor(bonus1),
        torch.tensor(first) if own else None,
        verified,
    )
    Unread.armed = False
    want = call(on_host, host_requests, None if own else torch.cat(host_hidden), bonus1, first)
    assert torch.equal(got, want)
    same_logits(on_device, on_host)
    kept = torch.tensor(kept_slots)
    for a_pool, b_pool in zip(
        on_device.kv_pool.k + on_device.kv_pool.v, on_host.kv_pool.k + on_host.kv_pool.v
    ):
        torch.testing.assert_close(a_pool[kept], b_pool[kept], rtol=1e-5, atol=1e-5)

    # The next step decodes bonus1 after the kept positions (the rejected ones are past the
    # length): both proposers read the draft K/V the verify left.
    requests, bonus2 = [], ids(3)
    for i, (row, p) in enumerate(zip(table_rows, prompt_ids)):
        at = len(p) + accepted[i] + 1
        slot = take(1)
        table[row, at] = slot[0]
        requests.append(DraftRequest(row, at, [0], slot))
    hidden = rows(3)
    after = [call(p, requests, hidden, bonus2, bonus1) for p in (on_device, on_host)]
    assert torch.equal(after[0], after[1])
    same_logits(on_device, on_host)


def same_logits(a: EagleProposer, b: EagleProposer) -> None:
    """The last propose call's logits, round by round, on two proposers (keep_logits)."""
    assert len(a.logits) == len(b.logits)
    for got, want in zip(a.logits, b.logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def serve_with_trap(folders, algorithm, device, monkeypatch, topk=1):
    """Serve greedy traffic with algorithm (triton attention, graphs; topk > 1: trees), the accepted
    counts an Unread armed from each verify until the step's collect; (the tokens, plain decoding's,
    verify steps)."""
    extra = {"speculative_eagle_topk": topk} if topk > 1 else {}
    requests = [(f"r{i}", p, 6 + 2 * i, greedy(), {}) for i, p in enumerate(prompts(5, 2))]
    target, head = folders / "target", folders / algorithm
    ref = graphs.plain_tokens(target, device, requests)
    runner = graphs.make_runner(target, algorithm, head, device=device, **extra)
    verify = runner_module.verify_on_device
    verifies = []

    def trapped_verify(*args, **kwargs):
        spec = verify(*args, **kwargs)
        spec.verified.num_accepted = spec.verified.num_accepted.as_subclass(Unread)
        Unread.armed = True
        verifies.append(spec)
        return spec

    monkeypatch.setattr(runner_module, "verify_on_device", trapped_verify)
    launch, collect = runner.launch, runner.collect

    def guarded_launch(step):
        drafting = any(r.draft_ids for r in step.continuing_requests)
        if device == "cuda" and drafting:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(step)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")

    def disarming_collect(launched):
        Unread.armed = False
        return collect(launched)

    runner.launch, runner.collect = guarded_launch, disarming_collect
    sched = graphs.scheduler(runner, algorithm, head, **extra)
    try:
        tokens, trace = graphs.serve(runner, sched, requests)
    finally:
        Unread.armed = False
    assert any(proposed for step in trace for *_, proposed in step)
    if topk > 1:  # trees were verified
        assert any(s.verified.rows is not None for s in verifies)
    return tokens, ref, len(verifies)


@pytest.mark.parametrize("algorithm, topk", [("EAGLE3", 1), ("STANDALONE", 1), ("EAGLE3", 2)])
def test_launch_reads_no_accepted_count_before_collect(folders, algorithm, topk, monkeypatch):
    """Served through the scheduler: no launch reads a verify step's accepted counts (the draft's
    rounds, graphs and all; chains and trees), and the outputs equal plain decoding's."""
    tokens, ref, verifies = serve_with_trap(folders, algorithm, "cpu", monkeypatch, topk)
    assert tokens == ref and verifies > 0


@pytest.mark.cuda
@NEEDS_GPU
@pytest.mark.parametrize(
    "algorithm, topk", [("EAGLE", 1), ("EAGLE3", 1), ("STANDALONE", 1), ("EAGLE3", 2)]
)
def test_verify_steps_launch_without_a_sync_on_a_gpu(folders, algorithm, topk, monkeypatch):
    """Real CUDA graphs (the target's and the head's rounds): every step with drafts launches under
    set_sync_debug_mode("error") (a synchronizing call raises) and reads no count before collect."""
    tokens, ref, verifies = serve_with_trap(folders, algorithm, "cuda", monkeypatch, topk)
    assert tokens == ref and verifies > 0


# A tree of 5 drafts (node: parent): 0: root, 1: root, 2: 0, 3: 1, 4: 3; 3 deep.
TREE_PARENTS = [-1, -1, 0, 1, 3]
TREE_PATHS = [[], [1], [1, 3, 4]]  # what each of three requests accepts (0, 1 and 3 drafts)


@pytest.mark.parametrize("algorithm, backend", [("EAGLE", "torch_native"), ("EAGLE3", "triton")])
def test_tree_proposals_after_a_verify_equal_the_host_path(folders, algorithm, backend):
    """Three requests verify the same 5-draft tree and accept no draft, the second branch's first
    node, and a 3-deep path off the first branch. The tree proposer given the root and 3 positions
    per request (the tree's depth: the verify's tokens, the accepted paths' hidden rows, staged slots)
    and the counts on the device proposes the trees it proposes given each accepted path on the host
    (its slots, tokens and hidden rows), leaves the same draft K/V at the kept slots (the path's
    slots, copied from the staging slots on the device), and the next step proposes alike on both.
    The draft pools start as NaN; with the triton backend the counts are never read on the host."""
    cpu = torch.device("cpu")
    head = load_draft(folders, algorithm, cpu)
    width = HIDDEN * len(getattr(head, "capture_layers", ()) or (0,))
    attn = create_attention_backend(backend, cpu, head.kv_shape[1])
    topk, nodes = 2, 5

    def proposer():
        p = EagleProposer(head, SLOTS, 4, K, attn, cpu, torch.float32, keep_logits=True, topk=topk)
        return nan_pools(p)

    on_device, on_host = proposer(), proposer()
    draw = Draws(5)
    g, take, ids = draw.g, draw.take, draw.ids

    table = torch.zeros(4, 64, dtype=torch.int64)
    table_rows = [3, 0, 2]
    prompt_ids = [ids(n) for n in (6, 11, 8)]
    requests, hidden, bonus0 = [], [], ids(3)
    for row, p, b in zip(table_rows, prompt_ids, bonus0):
        slots = take(len(p))
        table[row, : len(p)] = torch.tensor(slots)
        requests.append(DraftRequest(row, 0, p[1:] + [b], slots))
        hidden.append(torch.randn(len(p), width, generator=g))
    hidden = torch.cat(hidden)
    before = [
        p.propose_tree(table, requests, hidden, K, nodes, torch.tensor(bonus0))
        for p in (on_device, on_host)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*before))

    # The verify step: root + 5 drafts per request. The runner's _keep_tree_paths has moved the
    # accepted path's slots right after the root; the columns past it keep the draft-order slots.
    depth = 3
    bonus1 = ids(3)
    tokens = torch.full((3, nodes + 1), -1, dtype=torch.int64)
    rows = torch.full((3, nodes + 1), -1, dtype=torch.int64)
    device_requests, host_requests, device_hidden, host_hidden, kept_slots = [], [], [], [], []
    for i, (row, p, path) in enumerate(zip(table_rows, prompt_ids, TREE_PATHS)):
        prefix, drafts = len(p), ids(nodes)
        step_slots = take(1 + nodes)  # the root's, then each draft's
        moved = [step_slots[1 + n] for n in path]
        rest = [s for s in step_slots[1:] if s not in moved]
        table[row, prefix : prefix + 1 + nodes] = torch.tensor([step_slots[0]] + moved + rest)
        tokens[i, : len(path) + 1] = torch.tensor([drafts[n] for n in path] + [bonus1[i]])
        rows[i, : len(path) + 1] = torch.tensor([0] + [1 + n for n in path])
        step_hidden = torch.randn(1 + nodes, width, generator=g)  # the verify step's rows
        device_hidden.append(step_hidden.index_select(0, rows[i, : 1 + depth].clamp(min=0)))
        host_hidden.append(step_hidden.index_select(0, rows[i, : 1 + len(path)]))
        device_requests.append(
            DraftRequest(row, prefix, [0] * (1 + depth), [0] * (1 + depth), i, staged=True)
        )
        host_requests.append(
            DraftRequest(
                row, prefix, [drafts[n] for n in path] + [bonus1[i]], [step_slots[0]] + moved
            )
        )
        kept_slots += [step_slots[0]] + moved
    counts = torch.tensor([len(path) for path in TREE_PATHS]).as_subclass(Unread)
    verified = DeviceVerify(tokens, counts, rows)
    Unread.armed = backend == "triton"
    got = on_device.propose_tree(
        table, device_requests, torch.cat(device_hidden), K, nodes, torch.tensor(bonus1), verified
    )
    Unread.armed = False
    want = on_host.propose_tree(
        table, host_requests, torch.cat(host_hidden), K, nodes, torch.tensor(bonus1)
    )
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    same_logits(on_device, on_host)
    kept = torch.tensor(kept_slots)
    for a_pool, b_pool in zip(
        on_device.kv_pool.k + on_device.kv_pool.v, on_host.kv_pool.k + on_host.kv_pool.v
    ):
        assert not a_pool[kept].isnan().any()
        torch.testing.assert_close(a_pool[kept], b_pool[kept], rtol=1e-5, atol=1e-5)

    # The next step decodes bonus1 after each kept path: both read the draft K/V the verify left.
    requests, bonus2 = [], ids(3)
    for row, p, path in zip(table_rows, prompt_ids, TREE_PATHS):
        at = len(p) + len(path) + 1
        slot = take(1)
        table[row, at] = slot[0]
        requests.append(DraftRequest(row, at, [0], slot))
    hidden = torch.randn(3, width, generator=g)
    after = [
        p.propose_tree(table, requests, hidden, K, nodes, torch.tensor(bonus2))
        for p in (on_device, on_host)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*after))
    same_logits(on_device, on_host)


def test_after_a_tree_verify_the_head_reads_the_accepted_paths_rows():
    """EagleStep.after_step for a verify step of a tree and a chain, the counts on the device: the
    tree's request runs its root and as many positions as the tree is deep, staged, with the hidden
    rows of the root and of the accepted path's nodes (row 1 + node; junk past the path); the chain's
    runs every position with its own rows; nothing read on the host."""
    step_obj = EagleStep.__new__(EagleStep)
    calls = []

    class Proposer:
        extra, max_positions = 0, 1000

        def positions_needed(self, seq_len, k):
            return seq_len + k - 1

        def propose_tree(self, table, requests, hidden, k, nodes, last, verified):
            calls.append((requests, hidden, verified))
            return torch.zeros(len(requests), nodes, dtype=torch.int64), torch.zeros(
                len(requests), nodes, dtype=torch.int64
            )

    step_obj.proposer, step_obj.num_steps, step_obj.topk, step_obj.tree_nodes = Proposer(), K, 2, 5
    step_obj.device = torch.device("cpu")
    tree = ContinuingRequest("t", [11, 12, 13, 14, 15, 16], draft_ids=[1, 2, 3, 4, 5])
    tree.draft_parents = list(TREE_PARENTS)
    chain = ContinuingRequest("c", [21, 22, 23], draft_ids=[7, 8])
    states = torch.arange(9, dtype=torch.float32)[:, None].expand(9, 4).contiguous()
    batch = SimpleNamespace(
        seq_spans=[("t", 0, 10, 6), ("c", 6, 20, 3)],
        seq_states=[SimpleNamespace(table_row=1, draft_pending=None)] * 2,
        input_ids=torch.zeros(9, dtype=torch.int64),
    )
    rows = torch.tensor([[0, 2, 4, 5, -1, -1], [0, 1, 2, -1, -1, -1]])
    accepted = torch.tensor([3, 2]).as_subclass(Unread)
    verified = DeviceVerify(torch.zeros(2, 6, dtype=torch.int64), accepted, rows)
    Unread.armed = True
    step_obj.after_step(
        StepInput(1, continuing_requests=[tree, chain]),
        batch,
        states,
        torch.zeros(2, 64, dtype=torch.int64),
        torch.zeros(2, dtype=torch.int64),
        (["t", "c"], verified),
    )
    Unread.armed = False
    ((requests, hidden, _),) = calls
    t, c = requests
    assert (t.prefix_len, t.num_tokens, t.verify_row, t.staged) == (10, 4, 0, True)
    assert (c.prefix_len, c.slots, c.verify_row, c.staged) == (20, [21, 22, 23], 1, False)
    assert hidden[:, 0].tolist() == [0, 2, 4, 5] + [6, 7, 8]
