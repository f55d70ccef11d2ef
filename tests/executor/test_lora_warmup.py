"""The warm-up with --enable-lora (issue 23): it runs kernels/lora.py's shrink and expand on every class of
rows the prefill shapes reach, in uniform tiles (one adapter; the base model) and mixed ones, on a warm-up
adapter of zeros it loads and unloads, so that afterwards no adapter is added, every GPU slot is free in
its first order and no request or slot-table row is left; an adapter of --lora-paths is served as before.

On a tiny random Llama in float32 on the CPU, the Triton kernels under TRITON_INTERPRET=1 (as
test_lora_vs_peft.py); the GPU plan's many steps run through spies that record each call and compute with
the kernels' torch references (the interpreter would take minutes)."""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.common.step import ContinuingRequest, NewRequest, StepInput  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402
from radixserve.executor.warmup import WARMUP_LORA_NAME, run_warmup  # noqa: E402
from radixserve.kernels import lora as kernels  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.hf_parity import SlotPool, build_hf_model, hf_last_logits, prompts  # noqa: E402
from tests.executor.lora_adapters import make_adapter  # noqa: E402
from tests.executor.warmup_harness import (  # noqa: E402
    CompileCounter,
    build_cuda_llama,
    cuda_runner,
    gpu_plan_warmup,
    serve_traffic,
    server_args,
)

ATOL = 1e-4  # as test_lora_vs_peft.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-warmup")
    hf = build_hf_model("llama", root / "base")
    peft_model = make_adapter(hf, root / "all8", "all8")
    return root / "base", root / "all8", hf, peft_model


def make_runner(setup, **kw) -> ModelRunner:
    kw.setdefault("device", "cpu")
    kw.setdefault("attention_backend", "torch_native")
    kw.setdefault("max_total_tokens", 2048)
    return ModelRunner(setup[0], runner_config(dtype="float32", enable_lora=True, **kw))


def rows_class(t: int) -> str:
    """The classes of row counts Triton specializes on."""
    return "1" if t == 1 else "x16" if t % 16 == 0 else "other"


def tile_kinds(slots: torch.Tensor) -> set[str]:
    """What the kernels do per tile of the step's launch: a tile GEMM on one adapter, nothing (base
    model), or one masked tile GEMM per run (mixed)."""
    kinds = set()
    for tile in slots.split(kernels.launch_for(len(slots)).block_t):
        ids = set(tile.tolist())
        kinds.add("mixed" if len(ids) > 1 else "base" if ids == {-1} else "adapter")
    return kinds


class KernelSpy:
    """Records (rows class, tile kind) of each lora_shrink / lora_expand call; computes with delegate."""

    def __init__(self, monkeypatch, shrink, expand):
        self.shrink: set[tuple[str, str]] = set()
        self.expand: set[tuple[str, str]] = set()
        self.slots_used: set[int] = set()
        self.launches: set[kernels.Launch] = set()  # each one its own compiled kernel

        def spy_shrink(x, a, slots, launch=None, out=None):
            self._record(self.shrink, slots)
            s = shrink(x, a, slots)
            return s if out is None else out.add_(s)  # out: zeros, the forward's buffer

        def spy_expand(y, s, b, scales, slots):
            self._record(self.expand, slots)
            return expand(y, s, b, scales, slots)

        monkeypatch.setattr(kernels, "lora_shrink", spy_shrink)
        monkeypatch.setattr(kernels, "lora_expand", spy_expand)

    def _record(self, seen, slots):
        self.slots_used |= set(slots.tolist()) - {-1}
        self.launches.add(kernels.launch_for(len(slots)))
        seen |= {(rows_class(len(slots)), kind) for kind in tile_kinds(slots)}


def assert_clean(runner: ModelRunner, loaded: list[str]) -> None:
    """As if no warm-up ran: the loaded adapters, no adapter in a slot, the slots in their first LRU
    order at scale 0, no request and every slot-table row free."""
    lora = runner.lora
    assert (
        lora.names() == loaded and [a["name"] for a in runner.model_info().lora_adapters] == loaded
    )
    assert lora.slot_names == [None] * lora.num_slots and lora.resident() == []
    assert lora._lru == list(range(lora.num_slots))
    assert lora.state.scales.tolist() == [0.0] * lora.num_slots
    assert runner.states == {} and runner.slot_table.free_rows == runner.slot_table.tensor.shape[0]


def test_the_gpu_plan_runs_every_lora_kernel_path_and_leaves_nothing(setup, monkeypatch):
    runner = make_runner(setup, max_lora_rank=8, max_loras_per_batch=2, lora_backend="triton")
    spy = KernelSpy(monkeypatch, kernels.shrink_reference, kernels.expand_reference)
    warmup = gpu_plan_warmup(runner, 24, 16, lora=runner.lora)
    base_names = [name for name, _ in warmup.plan()]
    lora_names = [name for name, _ in warmup.lora_plan(WARMUP_LORA_NAME)]
    assert all(f"LoRA {name}" in lora_names for name in base_names if name.startswith("prefill "))
    assert {
        "LoRA chunked prefill",
        "LoRA mixed prefill + decode",
        "LoRA eager decode of 17",
    } <= set(lora_names) and any(name.startswith("LoRA largest prefill") for name in lora_names)
    report = warmup.run()
    assert report.failed == [] and report.skipped == []
    expected = {
        ("1", "adapter"),  # prefill 1x1, decode of one
        ("x16", "adapter"),  # prefill 1x16
        ("other", "adapter"),  # prefill 1x7, 1x33
        ("x16", "base"),  # prefill 3x48: its base-model sequence's tiles
        ("x16", "mixed"),  # prefill 16x1
        ("other", "mixed"),  # prefill 3x5, 17x3, decode of 3
    }
    assert expected <= spy.shrink and expected <= spy.expand, (spy.shrink, spy.expand)
    assert spy.launches == {kernels.FEW, kernels.MANY, kernels.LARGE}  # every compiled variant
    assert spy.slots_used == {0}  # the warm-up adapter, in the first free slot
    assert_clean(runner, loaded=[])


def test_lora_paths_adapter_is_served_after_the_warmup(setup, monkeypatch):
    """run_warmup (the CPU plan) with the interpreted Triton kernels, then the adapter of --lora-paths
    gives PEFT's logits beside a base-model request."""
    _, folder, hf, peft_model = setup
    runner = make_runner(setup, lora_paths=f"all8={folder}", lora_backend="triton")
    spy = KernelSpy(monkeypatch, kernels.lora_shrink, kernels.lora_expand)  # the real kernels
    report = run_warmup(runner, server_args())
    assert report.failed == [] and report.skipped == []
    assert ("other", "mixed") in spy.shrink and ("other", "mixed") in spy.expand  # 2x7, 7 rows each
    assert_clean(runner, loaded=["all8"])
    pool = SlotPool(runner.kv_slots)
    ps = prompts(3, 9, 6)
    out = runner.step(
        StepInput(
            1,
            new_requests=[
                NewRequest("a", ps[0], pool.take(len(ps[0])), lora_name="all8"),
                NewRequest("b", ps[1], pool.take(len(ps[1]))),
            ],
        )
    )
    torch.testing.assert_close(out.logits[0], hf_last_logits(peft_model, ps[0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits[1], hf_last_logits(hf, ps[1]), atol=ATOL, rtol=0)
    assert (hf_last_logits(peft_model, ps[0]) - hf_last_logits(hf, ps[0])).abs().max() > 100 * ATOL
    assert runner.lora.resident() == ["all8"] and runner.lora.slot_names[0] == "all8"
    seq = ps[0] + [out.outputs[0].token_id]
    out = runner.step(StepInput(2, continuing_requests=[ContinuingRequest("a", pool.take(1))]))
    torch.testing.assert_close(out.logits[0], hf_last_logits(peft_model, seq), atol=ATOL, rtol=0)


def test_a_full_host_set_skips_the_lora_warmup_cleanly(setup, caplog):
    _, folder, _, _ = setup
    runner = make_runner(
        setup,
        lora_paths=f"all8={folder}",
        max_loras_per_batch=1,
        max_loaded_loras=1,
        lora_backend="torch",
    )
    with caplog.at_level(logging.WARNING, logger="radixserve.executor.warmup"):
        report = run_warmup(runner, server_args())
    assert report.failed == [] and report.skipped == ["LoRA prefill 2x7 + decode"]
    assert "LoRA warm-up did not run" in caplog.text and "--max-loaded-loras" in caplog.text
    assert_clean(runner, loaded=["all8"])


def test_the_warmup_under_tensor_parallelism(tmp_path):
    """Two CPU shards (gloo): every shard loads and unloads the warm-up adapter (the leader's broadcast),
    and afterwards the group gives one runner's logits for an adapter of --lora-paths beside the base
    model (the torch backend: the shards' Triton kernels would run in the interpreter)."""
    from tests.executor.lora_tp_ranks import build_lora_runner, run_lora_group, warmup_scenario
    from tests.tp_ranks import ATOL as TP_ATOL

    hf = build_hf_model("llama", tmp_path / "model")
    for i, name in enumerate(("qv4", "all8")):
        make_adapter(hf, tmp_path / "adapters" / name, name, seed=i)
    one = build_lora_runner(str(tmp_path / "model"), tmp_path / "adapters", "torch")
    expected = warmup_scenario(one)
    got = run_lora_group(
        tmp_path / "model", tmp_path / "adapters", tmp_path / "tp2.pt", scenario="warmup"
    )
    assert got["failed"] == expected["failed"] == [] and got["skipped"] == []
    assert got["loaded"] == expected["loaded"] == ["all8", "qv4"]
    torch.testing.assert_close(got["prefill"], expected["prefill"], atol=TP_ATOL, rtol=TP_ATOL)
    want = hf_last_logits(make_adapter(hf, tmp_path / "again", "qv4", seed=0), list(range(3, 12)))
    torch.testing.assert_close(got["prefill"][0], want, atol=ATOL, rtol=0)


@pytest.mark.cuda
def test_lora_traffic_after_the_warmup_compiles_nothing(tmp_path):
    """On a GPU (not run on the CPU): with an adapter of --lora-paths in use beside the base model, in
    prefills of every size class and decodes (graphs and eager), no Triton kernel compiles after the
    warm-up."""
    hf = build_cuda_llama(tmp_path / "base")
    make_adapter(hf, tmp_path / "all8", "all8")
    runner = cuda_runner(
        tmp_path / "base", 16, lora_paths=f"all8={tmp_path / 'all8'}", max_lora_rank=8
    )
    report = run_warmup(runner, server_args(max_running_requests=64))
    assert report.failed == [] and report.skipped == []
    assert_clean(runner, loaded=["all8"])
    with CompileCounter() as counter:
        serve_traffic(
            runner, [1, 2, 5, 17, 23], [1, 3, 15, 16, 17, 64, 257], decodes=2, adapters=["all8", ""]
        )
    assert (counter.compiles, counter.tunes) == (0, 0), counter.what
