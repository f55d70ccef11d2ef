"""The radixserve command: every service starts alone with --help; flags round-trip to children."""

import os
import subprocess
import sys

import pytest

from radixserve.cli import SERVICES, build_parser
from radixserve.common.args import ServerArgs, args_from_namespace

SGLANG_FLAGS = [
    "--model-path",
    "--tokenizer-path",
    "--host",
    "--port",
    "--served-model-name",
    "--dtype",
    "--context-length",
    "--mem-fraction-static",
    "--max-running-requests",
    "--max-total-tokens",
    "--max-prefill-tokens",
    "--schedule-policy",
    "--disable-radix-cache",
    "--load-format",
    "--random-seed",
    "--log-level",
]


@pytest.mark.parametrize("command", ["serve", *SERVICES])
def test_help_lists_the_sglang_flags(command):
    out = subprocess.run(
        [sys.executable, "-m", "radixserve.cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for flag in SGLANG_FLAGS:
        assert flag in out.stdout, flag


def test_defaults_match_sglang():
    args = args_from_namespace(build_parser().parse_args(["serve"]), "serve")
    assert args.port == 30000 and args.host == "127.0.0.1"
    assert args.schedule_policy == "fcfs" and args.load_format == "auto" and args.dtype == "auto"


def test_flags_round_trip_to_child_processes():
    parser = build_parser()
    argv = [
        "serve",
        "--model-path",
        "/m",
        "--dtype",
        "float32",
        "--max-total-tokens",
        "4096",
        "--disable-radix-cache",
        "--schedule-policy",
        "lpm",
        "--mem-fraction-static",
        "0.5",
    ]
    args = args_from_namespace(parser.parse_args(argv), "serve")
    again = args_from_namespace(parser.parse_args(["executor", *args.to_cli()]), "executor")
    assert {**vars(again), "service": "serve"} == vars(args)
    assert (
        isinstance(again, ServerArgs)
        and again.max_total_tokens == 4096
        and again.disable_radix_cache
    )


def test_bad_flag_values_are_rejected():
    out = subprocess.run(
        [sys.executable, "-m", "radixserve.cli", "serve", "--schedule-policy", "bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_check_env_reports_versions():
    out = subprocess.run(
        [sys.executable, "-m", "radixserve.cli", "check-env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for key in ("Python", "torch", "transformers", "grpcio", "CUDA available", "Embedded model"):
        assert key in out.stdout


def test_sigterm_stops_executor_and_scheduler_cleanly(tmp_path):
    import json
    import signal
    import time

    from tests.stack import free_ports

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": 64,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
                "eos_token_id": 2,
                "dtype": "float32",
            }
        )
    )
    exe_port, sch_port = free_ports(2)
    common = [
        "--model-path",
        str(tmp_path),
        "--load-format",
        "dummy",
        "--max-total-tokens",
        "256",
        "--executor-addr",
        f"127.0.0.1:{exe_port}",
        "--scheduler-addr",
        f"127.0.0.1:{sch_port}",
    ]
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "radixserve.cli", name, *common],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("executor", "scheduler")
    }
    try:
        for name, proc in procs.items():
            deadline = time.time() + 120
            for line in proc.stderr:
                if f"{name} ready on" in line or time.time() > deadline:
                    break
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            assert proc.wait(30) == 0, name
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def test_sigterm_stops_a_scheduler_still_waiting_for_its_executor():
    import signal
    import time

    from tests.stack import free_ports

    exe_port, sch_port = free_ports(2)  # nothing listens on the executor's port
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "radixserve.cli",
            "scheduler",
            "--executor-addr",
            f"127.0.0.1:{exe_port}",
            "--scheduler-addr",
            f"127.0.0.1:{sch_port}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:
            if "waiting for the executor" in line:
                break
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_executor_loads_torch_with_sleeping_openmp_threads():
    # OMP_WAIT_POLICY is read once, when torch loads libgomp: it must be in the environment by then, and an
    # operator's own setting wins.
    probe = (
        "import importlib, os, sys\n"
        "from radixserve import cli\n"
        "def fake(name):\n"
        "    print(name, os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
        "    raise SystemExit(0)\n"
        "importlib.import_module = fake\n"
        "cli.main(['executor'])\n"
    )
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.stdout.split() == ["radixserve.executor.server", expected, "False"], (
            out.stdout + out.stderr
        )
