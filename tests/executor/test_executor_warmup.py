"""Warm-up before ready: it runs every path traffic takes, leaves the runner as it found it (no request,
every slot-table row free, the same greedy tokens afterwards), fits any KV pool, and on a GPU no kernel is
compiled or autotuned by the traffic that follows."""

import json
import types

import pytest

from radixserve.executor.runner import ModelRunner
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.warmup import Warmup, run_warmup
from tests.executor.tiny_llama import TINY_CONFIG, cpu_runner
from tests.executor.warmup_harness import (
    CompileCounter,
    build_cuda_llama,
    cuda_runner,
    gpu_plan_warmup,
    serve_traffic,
    server_args,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-warmup")
    (folder / "config.json").write_text(
        json.dumps({**TINY_CONFIG, "max_position_embeddings": 4096})
    )
    return folder


def greedy(runner: ModelRunner, prompt: list[int], steps: int) -> list[int]:
    out = runner.step(
        StepInput(100, new_requests=[NewRequest("probe", prompt, list(range(1, len(prompt) + 1)))])
    )
    tokens = [out.outputs[0].token_id]
    for s in range(steps):
        out = runner.step(
            StepInput(
                101 + s, continuing_requests=[ContinuingRequest("probe", [len(prompt) + 1 + s])]
            )
        )
        tokens.append(out.outputs[0].token_id)
    runner.step(StepInput(200, finished_request_ids=["probe"]))
    return tokens


def test_warmup_leaves_the_runner_clean(model_dir):
    runner = cpu_runner(model_dir, 4096, load_format="dummy")
    before = greedy(runner, [3, 4, 5, 6, 7], 6)
    report = run_warmup(runner, server_args())  # the CPU plan: one small prefill and its decodes
    assert report.skipped == [] and report.failed == [] and report.steps == 4 and report.tokens == 9
    assert runner.states == {} and runner.logits_processor is not None
    assert (
        greedy(runner, [3, 4, 5, 6, 7], 6) == before
    )  # nothing the warm-up wrote is read afterwards
    # The whole GPU plan through the same runner: every scenario, and the runner still clean.
    report = gpu_plan_warmup(runner, 64, 0, TINY_CONFIG["vocab_size"]).run()
    assert (
        report.skipped == [] and report.failed == [] and report.steps >= 30 and runner.states == {}
    )
    assert greedy(runner, [3, 4, 5, 6, 7], 6) == before


def test_the_gpu_plan_is_made_of_valid_steps(model_dir):
    """Every scenario of the GPU plan (all shape classes, eager decode above the graphs, the largest prefill)
    run through a CPU runner: no step is refused and the runner ends clean."""
    runner = cpu_runner(model_dir, 12000, load_format="dummy")
    warmup = gpu_plan_warmup(runner, 24, 16, TINY_CONFIG["vocab_size"])
    names = [name for name, _ in warmup.plan()]
    assert "eager decode of 17" in names and "largest prefill 16x512" in names
    report = warmup.run()
    assert (
        report.failed == []
        and report.skipped == []
        and report.tokens > 9000
        and runner.states == {}
    )


def test_a_small_pool_skips_what_does_not_fit_without_failing(model_dir):
    runner = cpu_runner(model_dir, 25, load_format="dummy")
    report = gpu_plan_warmup(runner, 64, 0, TINY_CONFIG["vocab_size"]).run()
    assert report.steps > 0 and report.skipped and report.failed == [] and runner.states == {}


def test_the_plan_follows_the_step_limits(model_dir):
    runner = types.SimpleNamespace()
    small = Warmup(
        runner,
        kv_slots=100_000,
        vocab_size=128,
        max_prefill_tokens=16,
        chunked_prefill_size=8,
        max_running_requests=4,
        graph_max_bs=0,
        on_gpu=False,
    )
    names = [name for name, _ in small.plan()]
    assert names == ["prefill 1x7 + decode"]  # nothing is compiled per shape on the CPU
    gpu = Warmup(
        runner,
        kv_slots=100_000,
        vocab_size=128,
        max_prefill_tokens=16,
        chunked_prefill_size=8,
        max_running_requests=4,
        graph_max_bs=2,
        on_gpu=True,
    )
    names = [name for name, _ in gpu.plan()]
    assert (
        "prefill 1x7 + decode" in names and "prefill 1x16 + decode" not in names
    )  # chunks of 8 tokens
    assert not any(name.startswith(("prefill 16x", "prefill 17x", "largest")) for name in names)
    assert "eager decode of 3" in names  # above the graphs' batch sizes
    gpu = Warmup(
        runner,
        kv_slots=100_000,
        vocab_size=128,
        max_prefill_tokens=16384,
        chunked_prefill_size=8192,
        max_running_requests=512,
        graph_max_bs=256,
        on_gpu=True,
    )
    names = [name for name, _ in gpu.plan()]
    assert (
        "eager decode of 257" in names
        and "largest prefill 16x512" in names
        and "prefill 17x16 + decode" in names
    )


# --- GPU: traffic after the warm-up compiles nothing ----------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("quantization", [None, "fp8"])  # fp8: kernels/fp8_gemm.py's kernels
def test_traffic_after_the_warmup_compiles_and_autotunes_nothing(tmp_path, quantization):
    build_cuda_llama(tmp_path)
    runner = cuda_runner(tmp_path, 32, quantization=quantization)
    report = run_warmup(runner, server_args(max_running_requests=64))
    assert report.failed == [] and report.skipped == []
    with CompileCounter() as counter:
        serve_traffic(runner, [1, 2, 5, 9, 16, 23], [1, 3, 15, 16, 17, 31, 64, 100, 257], decodes=3)
    assert (counter.compiles, counter.tunes) == (0, 0), counter.what
