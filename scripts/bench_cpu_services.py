"""Where a CPU token's time goes through the five-process stack: CPU seconds per output token of each
process (gateway, tokenizer, scheduler, executor, detokenizer and this client), with wall tok/s.

Serves the embedded SmolLM2-135M-Instruct (bf16 unless --dtype), warms up, then alternates
--repeats bs1 streams of --output-len tokens and (with --concurrency > 1) one burst of that many
concurrent streams, reading every process's CPU time from /proc around each run. Per-token CPU is the
figure to compare between commits on a shared machine; wall tok/s moves with other people's load.

Usage: python scripts/bench_cpu_services.py [--repeats 5] [--output-len 128] [--concurrency 16]
[--stream-interval 1 8] [--baseline-python PY] [--env NAME=V1,V2] [-- SERVE_FLAGS]. Prints one JSON line
per run, then one with the medians (per --stream-interval value, per tree with --baseline-python and per
--env value: one server each, their runs alternated).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from scripts.bench_cpu import PROMPT, start_stack_with, stream_one  # noqa: E402
from tests.stack import stop_stack  # noqa: E402

SERVICES = ("gateway", "tokenizer", "scheduler", "executor", "detokenizer")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def service_pids(launcher_pid: int) -> dict[str, int]:
    """The launcher's children by the service they run (`python -m radixserve.cli NAME ...`)."""
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == launcher_pid and b"radixserve.cli" in argv:
            name = argv[argv.index(b"radixserve.cli") + 1].decode()
            if name in SERVICES:
                pids[name] = int(entry)
    return pids


def measured(pids: dict[str, int], run) -> tuple[dict, float, int]:
    """run() -> output tokens; returns (CPU µs per output token by process, wall s, tokens)."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    before["client"] = client_cpu_seconds()
    t0 = time.perf_counter()
    tokens = run()
    wall = time.perf_counter() - t0
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    after["client"] = client_cpu_seconds()
    per_token = {name: (after[name] - before[name]) / tokens * 1e6 for name in after}
    return per_token, wall, tokens


def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU milliseconds per second of each service while no request runs (timers, polling)."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    return {
        name: round((cpu_seconds(pid) - before[name]) / seconds * 1e3, 2)
        for name, pid in pids.items()
    }


def spy(pids: dict[str, int], folder: str) -> list[subprocess.Popen]:
    os.makedirs(folder, exist_ok=True)
    return [
        subprocess.Popen(
            [
                "py-spy",
                "record",
                "-r",
                "200",
                "--format",
                "raw",
                "--gil",  # only samples that run Python (a thread waiting in C is not CPU)
                "--nonblocking",  # without pausing the process, which would add to its CPU time
                "-o",
                f"{folder}/spy-{name}.txt",
                "-p",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--label", default="", help="a name printed with every line")
    p.add_argument(
        "--stream-interval",
        type=int,
        nargs="+",
        metavar="N",
        help="one server per value, started with --stream-interval N, their runs alternated "
        "(e.g. 1 8: a side-by-side comparison on a shared machine); labels get `si=N`",
    )
    p.add_argument(
        "--baseline-python",
        metavar="PY",
        help="also serve with another checkout's venv python (e.g. the commit before a change), the two "
        "servers' runs alternated; labels get `new` / `base`",
    )
    p.add_argument(
        "--env",
        metavar="NAME=V1,V2",
        help="one server per value of an environment variable, e.g. "
        "RADIXSERVE_CPU_DECODE_SPLIT_STAGES=0,1; labels get `NAME=V`",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy every service over the bs1 runs into DIR/spy-NAME.txt",
    )
    p.add_argument("serve_flags", nargs="*", help="extra flags for radixserve serve (after --)")
    a = p.parse_args()
    prefix = f"{a.label} " if a.label else ""
    variants = [(a.label, [])]
    if a.stream_interval:
        variants = [(f"{prefix}si={n}", ["--stream-interval", str(n)]) for n in a.stream_interval]
    pythons = [("", sys.executable)]
    if a.baseline_python:
        pythons = [("new", sys.executable), ("base", a.baseline_python)]
    envs = [("", {})]
    if a.env:
        name, _, values = a.env.partition("=")
        envs = [(f"{name}={v}", {name: v}) for v in values.split(",")]
    variants = [
        (" ".join(filter(None, (label, tree, env_label))), flags, python, env)
        for label, flags in variants
        for tree, python in pythons
        for env_label, env in envs
    ]
    runs = {label: {"bs1": [], "concurrent": []} for label, *_ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        stacks = []
        try:
            for k, (label, flags, python, env) in enumerate(variants):
                saved = {name: os.environ.get(name) for name in env}
                os.environ.update(env)  # the stack's processes inherit it
                try:
                    stack = start_stack_with(
                        python, a.dtype, [*flags, *a.serve_flags], log_path=f"{tmp}/serve{k}.log"
                    )
                finally:
                    for name, value in saved.items():
                        if value is None:
                            os.environ.pop(name, None)
                        else:
                            os.environ[name] = value
                stacks.append((label, stack, service_pids(stack.proc.pid)))
            for label, stack, pids in stacks:
                stream_one(stack.base_url, 8)  # warm-up
                idle = idle_cpu(pids, a.idle_seconds)
                print(json.dumps({"label": label, "run": "idle", "cpu_ms_per_s": idle}), flush=True)
            for i in range(a.repeats):
                for label, stack, pids in stacks:  # alternated: the same load for each
                    profile = f"{a.profile}/{label}" if a.profile and len(stacks) > 1 else a.profile
                    measure_round(
                        a, i, label, stack, pids, runs[label], profile if i == 0 else None
                    )
        finally:
            for _, stack, _ in stacks:
                stop_stack(stack)
    for label, by_kind in runs.items():
        for kind, rs in by_kind.items():
            if not rs:
                continue
            median = {
                "tok_s": statistics.median(r["tok_s"] for r in rs),
                "cpu_us": {
                    k: statistics.median(r["cpu_us"][k] for r in rs) for k in rs[0]["cpu_us"]
                },
            }
            print(
                json.dumps({"label": label, "run": kind, "median_of": len(rs), **_rounded(median)})
            )


def measure_round(a, i: int, label: str, stack, pids, runs: dict, profile: str | None) -> None:
    """One bs1 stream (py-spied into profile, when given) and, with --concurrency > 1, one burst."""
    spies = spy(pids, profile) if profile else []
    single = {}

    def bs1():
        single.update(stream_one(stack.base_url, a.output_len))
        return single["completion_tokens"]

    cpu, wall, tokens = measured(pids, bs1)
    for proc in spies:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    runs["bs1"].append({"tok_s": single["decode_tok_s"], "cpu_us": cpu})
    print(
        json.dumps({"label": label, "run": "bs1", "i": i, **_rounded(runs["bs1"][-1])}), flush=True
    )
    if a.concurrency > 1:

        def burst():
            with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
                return sum(
                    r["completion_tokens"]
                    for r in pool.map(
                        lambda j: stream_one(stack.base_url, a.output_len, f"{PROMPT} ({i}, {j})"),
                        range(a.concurrency),
                    )
                )

        cpu, wall, tokens = measured(pids, burst)
        runs["concurrent"].append({"tok_s": tokens / wall, "cpu_us": cpu})
        print(
            json.dumps(
                {"label": label, "run": "concurrent", "i": i, **_rounded(runs["concurrent"][-1])}
            ),
            flush=True,
        )


def _rounded(r: dict) -> dict:
    cpu = {k: round(v) for k, v in r["cpu_us"].items()}
    services = sum(v for k, v in r["cpu_us"].items() if k not in ("executor", "client"))
    return {"tok_s": round(r["tok_s"], 1), "cpu_us_per_token": cpu, "services_us": round(services)}


if __name__ == "__main__":
    main()
