"""Tensor parallelism on the CPU (gloo): two shards as processes give the logits and greedy tokens of one,
a dead shard takes its executor down, `radixserve serve --tp 2` answers like --tp 1, the parallelism
flags, and `radixserve check-comm`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from radixserve.cli import build_parser
from radixserve.common.args import args_from_namespace, check_parallelism
from radixserve.executor.shard_group import ShardLayout
from radixserve.launcher import service_specs
from tests.stack import free_ports, stop_stack
from tests.executor.hf_parity import build_hf_model
from tests.tiny_stack import children, generate, service_pids, start_tiny_stack
from tests.tp_ranks import ATOL, GREEDY_TOKENS, build_runner, on_cpu, run_group, scenario

CONFIGS = {
    # KV heads split over the shards; a vocabulary that does not split evenly (padded slice).
    "kv_split_odd_vocab": lambda: transformers.LlamaConfig(
        vocab_size=251,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
    # One KV head, replicated on both shards; tied embeddings; biases on every projection.
    "kv_replicated_tied_bias": lambda: transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
    ),
}


def check_two_shards_match_one(config: str, folder: Path, device: str, atol: float) -> None:
    build_hf_model(CONFIGS[config](), folder / "model")
    expected = on_cpu(scenario(build_runner(str(folder / "model"), device)))
    got = run_group(folder / "model", folder / "tp2.pt", device=device)
    for part in ("prefill", "decode", "chunked"):
        torch.testing.assert_close(got[part], expected[part], atol=atol, rtol=atol, msg=part)
    assert (
        "ghost" in got["invalid_step_error"]
        and got["invalid_step_error"] == expected["invalid_step_error"]
    )
    assert got["dropped"] == expected["dropped"] == 5
    assert len(got["greedy"]) == GREEDY_TOKENS and got["greedy"] == expected["greedy"]
    assert got["kv_slots"] == 1025


@pytest.mark.parametrize("config", CONFIGS)
def test_two_shards_match_one(config, tmp_path):
    check_two_shards_match_one(config, tmp_path, "cpu", ATOL)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("config", CONFIGS)
def test_two_gpu_shards_match_one_over_nccl(config, tmp_path):
    check_two_shards_match_one(config, tmp_path, "cuda", 1e-4)


def test_a_dead_shard_takes_the_executor_down(tmp_path):
    """So that the supervisor of `radixserve serve` restarts the executor with all its shards."""
    build_hf_model(CONFIGS["kv_split_odd_vocab"](), tmp_path)
    (port,) = free_ports(1)
    executor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "radixserve.cli",
            "executor",
            "--tp",
            "2",
            "--model-path",
            str(tmp_path),
            "--max-total-tokens",
            "256",
            "--executor-addr",
            f"127.0.0.1:{port}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        for line in executor.stderr:
            if "executor ready on" in line or time.time() > deadline:
                break
        (shard,) = children(executor.pid)
        assert b"--tp-rank\x001" in Path(f"/proc/{shard}/cmdline").read_bytes()
        subprocess.run(["kill", "-9", str(shard)], check=True)
        assert executor.wait(30) == 1
        assert "shard 1 exited with signal SIGKILL" in executor.stderr.read()
    finally:
        if executor.poll() is None:
            executor.kill()


def kill_shard_and_wait_for_restart(stack) -> None:
    executor = service_pids(stack.proc.pid)["executor"]
    (shard,) = children(executor)
    subprocess.run(["kill", "-9", str(shard)], check=True)
    deadline = time.monotonic() + 60
    while service_pids(stack.proc.pid).get("executor") in (executor, None):
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(0.2)


@pytest.mark.e2e
def test_serve_tp2_answers_like_tp1_and_restarts_when_a_shard_dies(tmp_path, tiny_stack):
    answers = {"1": generate(tiny_stack)}  # --tp 1, the default
    stack = start_tiny_stack(tmp_path / "tp2", "--tp", "2")
    try:
        answers["2"] = generate(stack)
        kill_shard_and_wait_for_restart(stack)
        answers["2 restarted"] = generate(stack)
    finally:
        stop_stack(stack)
    assert stack.proc.returncode == 0, stack.log_tail()
    assert len(answers["2"]["output_ids"]) == 24
    assert (
        answers["2"]["output_ids"]
        == answers["1"]["output_ids"]
        == answers["2 restarted"]["output_ids"]
    )
    assert answers["2"]["text"] == answers["1"]["text"]
    log = (tmp_path / "tp2" / "serve.log").read_text()
    assert (
        "shard 1 exited with signal SIGKILL" in log
        and "executor (pid" in log
        and "restarting it" in log
    )


# --- flags -----------------------------------------------------------------------------------------


def parse(*argv: str, command: str = "executor"):
    args = args_from_namespace(build_parser().parse_args([command, *argv]), command)
    check_parallelism(args)
    return args


def test_multi_node_flags_and_shard_layout():
    args = parse(
        "--tp", "4", "--nnodes", "2", "--node-rank", "1", "--nccl-init-addr", "10.0.0.1:5000"
    )
    assert (args.tp_size, args.nnodes, args.node_rank, args.dist_init_addr) == (
        4,
        2,
        1,
        "10.0.0.1:5000",
    )
    assert ShardLayout.from_args(args) == ShardLayout(rank=2, size=4, local_rank=0, local_size=2)
    assert ShardLayout.from_args(parse(*args.to_cli(), "--tp-rank", "3")) == ShardLayout(3, 4, 1, 2)
    assert ShardLayout.from_args(parse("--tp-size", "2")) == ShardLayout(0, 2, 0, 2)
    assert [s.name for s in service_specs(parse(*args.to_cli(), command="serve"))] == ["executor"]
    assert len(service_specs(parse("--tp", "2", command="serve"))) == 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tp", "3", "--nnodes", "2", "--dist-init-addr", "h:1"], "split evenly"),
        (["--tp", "2", "--nnodes", "2"], "--dist-init-addr"),
        (
            ["--tp", "2", "--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"],
            "--node-rank",
        ),
        (
            [
                "--tp",
                "4",
                "--nnodes",
                "2",
                "--node-rank",
                "1",
                "--dist-init-addr",
                "h:1",
                "--tp-rank",
                "1",
            ],
            "--tp-rank",
        ),
        (["--tp", "2", "--dist-init-addr", "no-port"], "HOST:PORT"),
        (["--tp", "2", "--is-embedding"], "--is-embedding"),
    ],
)
def test_parallelism_flags_that_do_not_fit_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse(*argv)


# --- check-comm ------------------------------------------------------------------------------------


def check_comm(*env: tuple[str, str]) -> tuple[int, list[dict]]:
    """`radixserve check-comm` on two local gloo ranks: its exit code and the ranks' JSON lines."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "radixserve.cli",
            "check-comm",
            "--backend",
            "gloo",
            "--nproc",
            "2",
            "--size-mb",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **dict(env)},
    )
    return out.returncode, sorted(
        (json.loads(line) for line in out.stdout.splitlines()), key=lambda r: r["rank"]
    )


def test_check_comm_passes_on_two_gloo_ranks():
    code, ranks = check_comm()
    assert code == 0 and [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["ok"] and r["world_size"] == 2 and r["backend"] == "gloo"
        assert r["checks"]["all_reduce"]["got"] == 1.0 and r["checks"]["all_gather"]["got"] == [
            0,
            1,
        ]
        assert r["checks"]["broadcast_object"]["ok"] and r["bandwidth"]["bytes"] == 2 * 2**20
        assert r["bandwidth"]["algbw_GBps"] > 0


def test_check_comm_detects_a_rank_with_wrong_values():
    code, ranks = check_comm(("RADIXSERVE_CHECK_COMM_FAULT_RANK", "1"))
    assert code == 1 and len(ranks) == 2
    for r in ranks:
        assert not r["ok"] and r["checks"]["all_reduce"] == {
            "ok": False,
            "got": 2.0,
            "expected": 1.0,
        }
        assert r["checks"]["all_gather"]["got"] == [0, 2] and r["checks"]["broadcast"]["ok"]
