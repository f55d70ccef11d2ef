"""Warm-up before ready: it runs every path traffic takes, leaves the runner as it found it (no request,
every slot-table row free, the same greedy tokens afterwards), fits any KV pool, and on a GPU no kernel is
compiled or autotuned by the traffic that follows."""

import json
import random
import types

import pytest
import torch
import transformers

from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.warmup import Warmup, run_warmup
from tests.executor.tiny_llama import TINY_CONFIG


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-warmup")
    (folder / "config.json").write_text(
        json.dumps({**TINY_CONFIG, "max_position_embeddings": 4096})
    )
    return folder


def server_args(**overrides):
    values = dict(max_prefill_tokens=16384, chunked_prefill_size=8192, max_running_requests=None)
    return types.SimpleNamespace(**{**values, **overrides})


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
    runner = ModelRunner(
        model_dir,
        runner_config(
            dtype="float32", device="cpu", load_format="dummy", random_seed=0, max_total_tokens=4096
        ),
    )
    before = greedy(runner, [3, 4, 5, 6, 7], 6)
    report = run_warmup(runner, server_args())  # the CPU plan: one small prefill and its decodes
    assert report.skipped == [] and report.failed == [] and report.steps == 4 and report.tokens == 9
    assert runner.states == {} and runner.logits_processor is not None
    assert (
        greedy(runner, [3, 4, 5, 6, 7], 6) == before
    )  # nothing the warm-up wrote is read afterwards
    # The whole GPU plan through the same runner: every scenario, and the runner still clean.
    warmup = Warmup(
        runner,
        kv_slots=runner.kv_slots,
        vocab_size=TINY_CONFIG["vocab_size"],
        max_prefill_tokens=16384,
        chunked_prefill_size=8192,
        max_running_requests=64,
        graph_max_bs=0,
        on_gpu=True,
    )
    report = warmup.run()
    assert (
        report.skipped == [] and report.failed == [] and report.steps >= 30 and runner.states == {}
    )
    assert greedy(runner, [3, 4, 5, 6, 7], 6) == before


def test_the_gpu_plan_is_made_of_valid_steps(model_dir):
    """Every scenario of the GPU plan (all shape classes, eager decode above the graphs, the largest prefill)
    run through a CPU runner: no step is refused and the runner ends clean."""
    runner = ModelRunner(
        model_dir,
        runner_config(
            dtype="float32",
            device="cpu",
            load_format="dummy",
            random_seed=0,
            max_total_tokens=12000,
        ),
    )
    warmup = Warmup(
        runner,
        kv_slots=runner.kv_slots,
        vocab_size=TINY_CONFIG["vocab_size"],
        max_prefill_tokens=16384,
        chunked_prefill_size=8192,
        max_running_requests=24,
        graph_max_bs=16,
        on_gpu=True,
    )
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
    runner = ModelRunner(
        model_dir,
        runner_config(
            dtype="float32", device="cpu", load_format="dummy", random_seed=0, max_total_tokens=25
        ),
    )
    report = Warmup(
        runner,
        kv_slots=runner.kv_slots,
        vocab_size=TINY_CONFIG["vocab_size"],
        max_prefill_tokens=16384,
        chunked_prefill_size=8192,
        max_running_requests=64,
        graph_max_bs=0,
        on_gpu=True,
    ).run()
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


class CompileCounter:
    """Counts Triton JIT compilations (in-memory cache misses) and autotuning runs."""

    def __init__(self):
        import triton

        self.knobs = triton.knobs.runtime
        self.compiles = 0
        self.tunes = 0
        self.what: list[str] = []  # the compiled and autotuned kernels' names

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner

        self.previous = self.knobs.jit_cache_hook
        self.knobs.jit_cache_hook = self._count
        self.autotuner, self.original_bench = Autotuner, Autotuner._bench
        counter = self

        def bench(tuner, *args, **kwargs):
            counter.tunes += 1
            counter.what.append(f"autotune {getattr(tuner.fn, '__name__', tuner.fn)} {tuner.keys}")
            return counter.original_bench(tuner, *args, **kwargs)

        Autotuner._bench = bench
        return self

    def _count(self, *args, **kwargs):
        self.compiles += 1
        self.what.append(
            kwargs["repr"][:400]
        )  # the kernel's name, launch options and argument types
        return False  # compile as usual

    def __exit__(self, *exc):
        self.knobs.jit_cache_hook = self.previous
        self.autotuner._bench = self.original_bench


@pytest.mark.cuda
@pytest.mark.parametrize("quantization", [None, "fp8"])  # fp8: kernels/fp8_gemm.py's kernels
def test_traffic_after_the_warmup_compiles_and_autotunes_nothing(tmp_path, quantization):
    from tests.executor.hf_parity import build_hf_model

    build_hf_model(
        transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        ),
        tmp_path,
    )
    runner = ModelRunner(
        tmp_path,
        runner_config(
            dtype="bfloat16",
            device="cuda",
            max_total_tokens=65536,
            cuda_graph_max_bs=32,
            max_running_requests=64,
            quantization=quantization,
        ),
    )
    report = run_warmup(runner, server_args(max_running_requests=64))
    assert report.failed == [] and report.skipped == []
    rng = random.Random(0)
    with CompileCounter() as counter:
        slot, step = 1, 1
        live: list[str] = []
        for wave in range(
            6
        ):  # waves of prefills of random sizes joining running decodes, as traffic does
            new = []
            for i in range(rng.choice([1, 2, 5, 9, 16, 23])):
                length = rng.choice([1, 3, 15, 16, 17, 31, 64, 100, 257])
                new.append(
                    NewRequest(
                        f"w{wave}-{i}",
                        [rng.randrange(512) for _ in range(length)],
                        list(range(slot, slot + length)),
                    )
                )
                slot += length
            cont = [ContinuingRequest(rid, [slot + k]) for k, rid in enumerate(live)]
            slot += len(live)
            runner.step(StepInput(step, new_requests=new, continuing_requests=cont))
            step += 1
            live += [r.request_id for r in new]
            finished, live = (
                live[:-40],
                live[-40:],
            )  # at most 40 running, as the scheduler's cap would keep it
            for _ in range(3):
                cont = [ContinuingRequest(rid, [slot + k]) for k, rid in enumerate(live)]
                slot += len(live)
                runner.step(
                    StepInput(step, continuing_requests=cont, finished_request_ids=finished)
                )
                finished = []
                step += 1
        torch.cuda.synchronize()
    assert (counter.compiles, counter.tunes) == (0, 0), counter.what
