"""scripts/attack.py (issue 17's attack set) runs against a tiny stack with small counts and short limits,
ends within its time caps, and finds every attack answered bounded and correct."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.stack import stop_stack
from tests.tiny_stack import start_tiny_stack

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "attack.py"


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_attack_script_finds_every_attack_bounded_on_a_tiny_stack(tmp_path):
    # All eight attacks (defects 1-6 and 8 of issue 17), with small counts and short limits.
    stack = start_tiny_stack(
        tmp_path,
        "--max-queued-requests",
        "64",
        "--request-timeout",
        "3",
        "--http-header-timeout",
        "2",
        "--grammar-compile-timeout",
        "2",
    )
    results_path = tmp_path / "attack.jsonl"
    try:
        started = time.monotonic()
        run = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--base-url",
                stack.base_url,
                "--json",
                str(results_path),
                "--grpc-scheduler",
                stack.scheduler_addr,
                "--grpc-executor",
                flag(stack.proc.args, "--executor-addr"),
                "--grpc-token",
                stack.grpc_token,
                "--grammar-repeats",
                "2",
                "--grammar-client-timeout",
                "1",
                "--grammar-wait",
                "30",
                "--big-sequences",
                "16",
                "--big-max-tokens",
                "2000",
                "--slow-headers",
                "40",
                "--slow-headers-seconds",
                "15",
                "--repeat-seconds",
                "2",
                "--header-mb",
                "20",
                "--upload-disconnects",
                "4",
                # The probe's chat shares the CPU with the test suite here; the 2 s goal is measured in docs/security.md.
                "--probe-max-latency",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=200,
        )
        elapsed = time.monotonic() - started
        assert httpx.get(stack.base_url + "/health", timeout=10).status_code == 200
    finally:
        stop_stack(stack)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    results = [json.loads(line) for line in results_path.read_text().splitlines()]
    by_case = {f"{r['attack']}/{r['case']}": r for r in results}
    assert all(r["status"] in ("pass", "info") for r in results), out
    expected = {
        "grammar/huge-enum",
        "grammar/deep-nesting-150",
        "grammar/deep-nesting-1000",
        "grammar/slow-schema-waited",
        "grammar/slow-schema-again",
        "grammar/probe",
        "amplification/800-prompts-x-n128",
        "amplification/big-allowed-with-timeout",
        "amplification/probe",
        "slow-headers/unfinished-heads",
        "slow-headers/probe",
        "huge-header/200MB-header",
        "huge-header/1000-headers",
        "huge-header/probe",
        "internal/executor-step-none",
        "internal/scheduler-generate-none",
        "internal/scheduler-abort-all-none",
        "internal/executor-step-token-no-session",
        "internal/scheduler-generate-token",
        "n-over-queue/n-above-queue-limit",
        "upload-disconnect/cut-uploads",
        "null-content/null-content",
        "null-content/missing-content",
    }
    assert expected <= set(by_case), sorted(set(by_case))
    for case in expected:  # the ones the goal names must pass, not just inform
        assert by_case[case]["status"] == "pass", (case, out)
    assert by_case["huge-header/200MB-header"]["details"]["status"] == 431
    assert by_case["slow-headers/unfinished-heads"]["details"]["longest_s"] < 6, (
        out
    )  # --http-header-timeout 2
    assert "PASS internal/executor-step-none" in run.stdout and "0 failed" in run.stdout
    print(run.stdout, f"script ran {elapsed:.1f} s", sep="\n")
