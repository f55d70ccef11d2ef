"""Multi-LoRA serving in the ModelRunner against HF transformers + PEFT, on tiny random Llama and Qwen2
models in float32: one step mixing the base model and three adapters (ranks 4/8/16, different targets,
one with rsLoRA scaling) gives each request the logits of its adapter alone, prefill and decode, and the
greedy tokens of PEFT's generate; with fewer GPU slots than adapters, slots are reused (LRU) with the same
results; bad steps and adapters are refused.

Both backends: triton (kernels/lora.py, under TRITON_INTERPRET=1 on CPU) and torch.
Tolerance: logits to atol 1e-4 (fp32, as hf_parity.py); every adapter moves its logits by > 100x that.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.common.step import ContinuingRequest, NewRequest, StepError, StepInput  # noqa: E402
from radixserve.executor.lora.adapter import LoraError, LoraNotFound  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.hf_parity import SlotPool, build_hf_model, hf_last_logits, prompts  # noqa: E402
from tests.executor.lora_adapters import ADAPTERS, lora_paths, make_adapter  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    hf = build_hf_model(request.param, root / "base")
    refs = {"": hf}
    folders = {}
    for i, name in enumerate(ADAPTERS):
        folders[name] = root / name
        refs[name] = make_adapter(hf, folders[name], name, seed=i)
    return root / "base", folders, refs


def make_runner(setup, **kw):
    folder, folders, _ = setup
    kw.setdefault("lora_paths", lora_paths(folders))
    kw.setdefault("device", "cpu")
    kw.setdefault("attention_backend", "torch_native")
    return ModelRunner(folder, runner_config(dtype="float32", max_total_tokens=1024, **kw))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mixed_batch_matches_peft_per_adapter(setup, backend):
    _, _, refs = setup
    runner = make_runner(setup, lora_backend=backend)
    pool = SlotPool(runner.kv_slots)
    names = ["", "qv4", "all8", "mix16", "all8"]
    ps = prompts(5, 7, 11, 1, 9, 4)
    out = runner.step(
        StepInput(
            1,
            new_requests=[
                NewRequest(f"r{i}", p, pool.take(len(p)), lora_name=n)
                for i, (n, p) in enumerate(zip(names, ps))
            ],
        )
    )
    base = refs[""]
    for i, (n, p) in enumerate(zip(names, ps)):
        want = hf_last_logits(refs[n], p)
        torch.testing.assert_close(out.logits[i], want, atol=ATOL, rtol=0)
        if n:
            assert (want - hf_last_logits(base, p)).abs().max() > 100 * ATOL
    seqs = [p + [o.token_id] for p, o in zip(ps, out.outputs)]
    # decode of all five, in another order, beside a new base request
    order = [3, 0, 4, 1, 2]
    (q,) = prompts(6, 6)
    laid_out = []
    prepare = runner.lora.prepare_batch
    runner.lora.prepare_batch = lambda b: (
        laid_out.append([s.lora_name for s in b.seq_states]) or (prepare(b))
    )
    out = runner.step(
        StepInput(
            2,
            new_requests=[NewRequest("q", q, pool.take(len(q)))],
            continuing_requests=[ContinuingRequest(f"r{i}", pool.take(1)) for i in order],
        )
    )
    # The prefill first, then the decode tokens side by side per adapter (kernels/lora.py's runs).
    assert laid_out == [["", "", "all8", "all8", "mix16", "qv4"]]
    torch.testing.assert_close(out.logits[0], hf_last_logits(base, q), atol=ATOL, rtol=0)
    for k, i in enumerate(order):
        want = hf_last_logits(refs[names[i]], seqs[i])
        torch.testing.assert_close(out.logits[k + 1], want, atol=ATOL, rtol=0)


def test_greedy_tokens_match_peft_generate(setup):
    _, _, refs = setup
    runner = make_runner(setup)
    pool = SlotPool(runner.kv_slots, seed=1)
    names = ["", "qv4", "all8", "mix16"]
    ps = prompts(7, 6, 8, 5, 7)
    steps = 12  # the prefill's token and 11 decode steps, every request on its own adapter
    expected = []
    for n, p in zip(names, ps):
        with torch.no_grad():
            gen = refs[n].generate(
                input_ids=torch.tensor([p]),
                max_new_tokens=steps,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        expected.append(gen[0, len(p) :].tolist())
    out = runner.step(
        StepInput(
            1,
            new_requests=[
                NewRequest(f"g{i}", p, pool.take(len(p)), lora_name=n)
                for i, (n, p) in enumerate(zip(names, ps))
            ],
        )
    )
    got = [[o.token_id] for o in out.outputs]
    for s in range(steps - 1):
        out = runner.step(
            StepInput(
                s + 2,
                continuing_requests=[ContinuingRequest(f"g{i}", pool.take(1)) for i in range(4)],
            )
        )
        for i, o in enumerate(out.outputs):
            got[i].append(o.token_id)
    assert got == expected


def test_fewer_slots_than_adapters_reuses_slots(setup):
    _, _, refs = setup
    runner = make_runner(setup, max_loras_per_batch=2)
    pool = SlotPool(runner.kv_slots, seed=2)
    (p,) = prompts(8, 6)
    # three adapters, two slots: each step loads what it needs into the least recently used slot
    for step_id, pair in enumerate([("qv4", "all8"), ("mix16", "all8"), ("qv4", "mix16")]):
        reqs = [NewRequest(f"s{step_id}{n}", p, pool.take(len(p)), lora_name=n) for n in pair]
        out = runner.step(StepInput(step_id + 1, new_requests=reqs))
        for k, n in enumerate(pair):
            torch.testing.assert_close(out.logits[k], hf_last_logits(refs[n], p), atol=ATOL, rtol=0)
        runner.step(StepInput(10 + step_id, finished_request_ids=[r.request_id for r in reqs]))
    assert runner.lora.slot_loads == 4  # qv4, all8; mix16 over qv4; qv4 over all8 (mix16 kept)
    # three distinct adapters in one step do not fit: refused, nothing changed
    states = dict(runner.states)
    with pytest.raises(StepError, match="max-loras-per-batch"):
        runner.step(
            StepInput(
                20,
                new_requests=[
                    NewRequest(f"x{n}", p, pool.take(len(p)), lora_name=n) for n in ADAPTERS
                ],
            )
        )
    assert runner.states == states


def test_load_unload_and_refusals(setup, tmp_path):
    folder, folders, refs = setup
    runner = make_runner(setup, lora_paths=None, enable_lora=True, max_lora_rank=8)
    pool = SlotPool(runner.kv_slots, seed=3)
    (p,) = prompts(9, 5)
    with pytest.raises(StepError, match="not loaded"):
        runner.step(StepInput(1, new_requests=[NewRequest("u", p, pool.take(5), lora_name="qv4")]))
    assert not runner.states
    runner.lora.load("qv4", str(folders["qv4"]))
    out = runner.step(
        StepInput(2, new_requests=[NewRequest("u", p, pool.take(5), lora_name="qv4")])
    )
    torch.testing.assert_close(out.logits[0], hf_last_logits(refs["qv4"], p), atol=ATOL, rtol=0)
    with pytest.raises(LoraError, match="already loaded"):
        runner.lora.load("qv4", str(folders["qv4"]))
    with pytest.raises(LoraError, match="rank 16"):
        runner.lora.load("mix16", str(folders["mix16"]))
    with pytest.raises(LoraError, match="not a PEFT adapter"):
        runner.lora.load("nothing", str(tmp_path))
    runner.lora.unload("qv4")
    with pytest.raises(LoraNotFound):
        runner.lora.unload("qv4")
    assert runner.lora.names() == [] and runner.lora.resident() == []


def test_lora_off_refuses_adapter_requests(setup):
    runner = make_runner(setup, lora_paths=None)
    assert runner.lora is None
    with pytest.raises(StepError, match="enable-lora"):
        runner.step(StepInput(1, new_requests=[NewRequest("z", [3, 4], [1, 2], lora_name="qv4")]))


def test_cuda_graph_slot_buffer(setup):
    """What a captured graph reads (CUDA graphs themselves need a GPU: the merger's check): the LoRA
    layers see a fixed buffer during capture, and each replay fills it with the step's per-token
    slots, -1 for the padding of the bucket and for base-model tokens."""
    runner = make_runner(setup)
    lora = runner.lora
    with lora.graph_capture(4, 8):
        captured = lora.state.token_slots
        assert captured.tolist() == [-1] * 4
    assert lora.state.token_slots is None
    lora.prepare(["all8", "", "qv4"], [1, 1, 1])
    lora.graph_fill(3, 4)
    slot = {n: lora.slot_names.index(n) for n in ("all8", "qv4")}
    assert captured.tolist() == [slot["all8"], -1, slot["qv4"], -1]
    lora.prepare(["", ""], [1, 1])  # no adapter in the step: every entry -1
    lora.graph_fill(2, 4)
    assert captured.tolist() == [-1] * 4


def test_one_zeroed_shrink_buffer_per_forward(setup, monkeypatch):
    """The triton backend's shrink outputs are disjoint views of one buffer zeroed per model forward
    (one memset, not one per layer); a new forward (the model's pre-hook) gets a new buffer, so a
    step never sums into the last step's values (the PEFT comparisons above check the values)."""
    runner = make_runner(setup, lora_backend="triton")
    state, layers = runner.lora.state, list(runner.lora.layers.values())
    spans = sorted((lyr.scratch_offset, lyr.lora_a.shape[1]) for lyr in layers)
    assert all(o + w == nxt for (o, w), (nxt, _) in zip(spans, spans[1:]))
    assert spans[0][0] == 0 and state.scratch_width == sum(w for _, w in spans)
    buffers = []
    shrink_out = state.shrink_out
    monkeypatch.setattr(
        state,
        "shrink_out",
        lambda *a: (shrink_out(*a), buffers.append(state._scratch))[0],
    )
    pool = SlotPool(runner.kv_slots)
    (p,) = prompts(8, 5)
    out = runner.step(
        StepInput(1, new_requests=[NewRequest("a", p, pool.take(5), lora_name="all8")])
    )
    first = len(buffers)
    runner.step(StepInput(2, continuing_requests=[ContinuingRequest("a", pool.take(1))]))
    assert first == len(layers) and len(buffers) == 2 * len(layers), out
    assert all(b is buffers[0] for b in buffers[:first])
    assert all(b is buffers[first] for b in buffers[first:]) and buffers[first] is not buffers[0]


def test_target_modules_limit_the_wrapped_layers(setup):
    _, folders, refs = setup
    runner = make_runner(
        setup,
        lora_paths=f"qv4={folders['qv4']}",
        lora_target_modules="q_proj v_proj",
        max_lora_rank=16,
    )
    assert {name for _, name in runner.lora.layers} == {"qkv_proj"}
    with pytest.raises(LoraError, match="outside --lora-target-modules"):
        runner.lora.load("all8", str(folders["all8"]))
    (p,) = prompts(10, 6)
    out = runner.step(
        StepInput(1, new_requests=[NewRequest("t", p, list(range(1, 7)), lora_name="qv4")])
    )
    torch.testing.assert_close(out.logits[0], hf_last_logits(refs["qv4"], p), atol=ATOL, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_decode_matches_eager(setup):
    """On a GPU (`-m cuda`): decode steps of the base model and three adapters replayed from CUDA graphs
    (triton attention and LoRA kernels) give the logits of eager steps, and PEFT's."""
    _, _, refs = setup
    names = ["", "qv4", "all8", "mix16"]
    ps = prompts(11, 5, 7, 6, 8)
    logits = {}
    for graphs in (False, True):
        runner = make_runner(
            setup,
            device="cuda",
            attention_backend="triton",
            **({"cuda_graph_max_bs": 8} if graphs else {}),
        )
        assert (runner.cuda_graphs is not None) == graphs
        pool = SlotPool(runner.kv_slots, seed=4)
        runner.step(
            StepInput(
                1,
                new_requests=[
                    NewRequest(f"c{i}", p, pool.take(len(p)), lora_name=n)
                    for i, (n, p) in enumerate(zip(names, ps))
                ],
            )
        )
        out = runner.step(
            StepInput(
                2, continuing_requests=[ContinuingRequest(f"c{i}", pool.take(1)) for i in range(4)]
            )
        )
        logits[graphs] = out.logits.cpu()
    torch.testing.assert_close(logits[True], logits[False], atol=ATOL, rtol=0)
