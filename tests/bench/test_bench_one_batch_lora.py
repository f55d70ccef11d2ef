"""`radixserve bench one-batch --num-loras N --lora-rank R` on a tiny model (CPU): N random adapters on every
target, request b running adapter b mod N, all of them in GPU slots during the steps; and
scripts/make_dummy_lora.py's adapters load into a runner (--lora-paths)."""

import json
import sys

import pytest

from radixserve.bench import one_batch
from radixserve.common.step import NewRequest, StepInput
from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from tests.executor.hf_parity import build_hf_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_hf_model("llama", folder)
    return folder


def test_num_loras_record(tiny_model, capsys):
    argv = ["--model-path", str(tiny_model), "--device", "cpu", "--batch-size", "1", "4"]
    argv += ["--input-len", "6", "--output-len", "3", "--max-total-tokens", "200"]
    assert one_batch.main([*argv, "--num-loras", "4", "--lora-rank", "8"]) == 0
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(r["batch_size"], r["num_loras"], r["lora_rank"]) for r in records] == [
        (1, 4, 8),
        (4, 4, 8),
    ]
    assert all(r["median_decode_latency"] > 0 for r in records)


def test_every_request_runs_its_own_adapter(tiny_model):
    args = runner_config(dtype="float32", device="cpu", max_total_tokens=200, max_loras_per_batch=2)
    args.model_path, args.revision, args.download_dir = str(tiny_model), None, None
    args, names = one_batch.with_dummy_loras(args, 4, 8)
    assert names == ["lora0", "lora1", "lora2", "lora3"] and args.max_loras_per_batch == 4
    runner = ModelRunner(tiny_model, args)
    # the CLI's target over this runner (its __init__ builds one from the server flags)
    inproc = one_batch.InProcessTarget.__new__(one_batch.InProcessTarget)
    inproc.runner = runner
    inproc.kv_slots, inproc.vocab_size = runner.kv_slots, runner.config.vocab_size
    r = one_batch.run_once(inproc, 4, 5, 3, seed=1, lora_names=names)
    assert r["batch_size"] == 4
    assert sorted(runner.lora.resident()) == names and runner.lora.slot_loads == 4


def test_make_dummy_lora_script_writes_loadable_adapters(tiny_model, tmp_path, monkeypatch):
    sys.path.insert(0, "scripts")
    try:
        import make_dummy_lora
    finally:
        sys.path.remove("scripts")
    value = make_dummy_lora.main(
        ["--model-path", str(tiny_model), "--out", str(tmp_path), "--count", "2", "--rank", "4"]
    )
    assert value == (tmp_path / "lora_paths.txt").read_text().strip()
    runner = ModelRunner(
        tiny_model,
        runner_config(dtype="float32", device="cpu", max_total_tokens=200, lora_paths=value),
    )
    assert sorted(runner.lora.names()) == ["lora0", "lora1"] and runner.lora.max_rank == 4
    out = runner.step(
        StepInput(
            1,
            new_requests=[
                NewRequest("a", [5, 6, 7], [1, 2, 3]),
                NewRequest("b", [5, 6, 7], [4, 5, 6], lora_name="lora1"),
            ],
        )
    )
    assert (out.logits[0] - out.logits[1]).abs().max() > 1e-3  # the adapter changes the logits
