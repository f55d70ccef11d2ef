"""CPU figures through the full five-process stack with the embedded SmolLM2-135M-Instruct.

Prints JSON lines: bs1 decode tokens/s and 16-concurrent output tokens/s, per dtype.
Usage: python scripts/bench_cpu.py [--dtypes bfloat16 float32] [--output-len 128] [--hf-baseline]
       [--serve-args "--stream-interval 8"] [--llama-cpp-rounds N] [--cpu-breakdown N]
       [--baseline-python PY --rounds N]

--llama-cpp-rounds N (needs the optional llama-cpp-python package): instead of the figures above, N
rounds that alternate one bs1 request through the stack (kept running) with llama.cpp decoding the
same GGUF file the stack serves (all cores, greedy, the same prompt and token count) in this process;
each round prints both decode tokens/s and their ratio.

--cpu-breakdown N: instead, N bs1 requests through the stack, each followed by one JSON line of the CPU
time each of the stack's processes (launcher, gateway, tokenizer, scheduler, executor, detokenizer) spent
per generated token (from /proc, Linux only), beside the request's decode tokens/s: the services' share
of a token is everything but the executor's.

--baseline-python PY [--rounds N]: instead, side by side with another checkout (e.g. `git archive` of main
installed in its own venv): this checkout's stack and one started by PY (that venv's python) run at once
and take turns; each round BS1_PER_ROUND bs1 requests on each, alternating (their median), then one burst
of --concurrency requests on each; one JSON line per round with both figures, their ratios (this
checkout over the baseline) and the load average.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests.stack import start_stack, stop_stack  # noqa: E402

PROMPT = "Write a long essay about the history of the Roman Empire."
BS1_PER_ROUND = 3  # --baseline-python: bs1 requests per stack and round, alternating


def stream_one(base_url: str, output_len: int, prompt: str = PROMPT) -> dict:
    body = {
        "text": prompt,
        "stream": True,
        "sampling_params": {"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True},
    }
    t0 = time.perf_counter()
    first = last = None
    meta = {}
    with httpx.stream("POST", base_url + "/generate", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            first = first or now
            last = now
            meta = json.loads(line[6:]).get("meta_info", meta)
    n = meta["completion_tokens"]
    return {
        "ttft_s": first - t0,
        "e2e_s": last - t0,
        "completion_tokens": n,
        "decode_tok_s": (n - 1) / (last - first) if last > first else float("nan"),
    }


def bench(dtype: str, output_len: int, concurrency: int, serve_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack("--dtype", dtype, *serve_args, log_path=f"{tmp}/serve.log")
        try:
            stream_one(stack.base_url, 8)  # warm-up
            single = stream_one(stack.base_url, output_len)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                runs = list(
                    pool.map(
                        lambda i: stream_one(stack.base_url, output_len, f"{PROMPT} ({i})"),
                        range(concurrency),
                    )
                )
            wall = time.perf_counter() - t0
        finally:
            stop_stack(stack)
    out_tokens = sum(r["completion_tokens"] for r in runs)
    return {
        "dtype": dtype,
        "output_len": output_len,
        "bs1_decode_tok_s": round(single["decode_tok_s"], 1),
        "bs1_ttft_ms": round(single["ttft_s"] * 1e3, 1),
        "concurrency": concurrency,
        "concurrent_output_tok_s": round(out_tokens / wall, 1),
        "concurrent_wall_s": round(wall, 2),
    }


def llama_cpp_side_by_side(dtype: str, output_len: int, rounds: int, serve_args: list[str]):
    import llama_cpp

    from radixserve.common.model_files import embedded_gguf

    llm = llama_cpp.Llama(
        model_path=str(embedded_gguf()), n_ctx=1024, n_threads=os.cpu_count(), verbose=False
    )
    prompt_ids = llm.tokenize(PROMPT.encode())

    def llama_decode_tok_s() -> float:
        llm.reset()
        llm.eval(prompt_ids)
        t0 = time.perf_counter()
        for _ in range(output_len - 1):
            llm.eval([llm.sample(temp=0.0)])
        return (output_len - 1) / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack("--dtype", dtype, *serve_args, log_path=f"{tmp}/serve.log")
        try:
            stream_one(stack.base_url, 8)  # warm-up
            llama_decode_tok_s()
            for r in range(rounds):
                ours = stream_one(stack.base_url, output_len)["decode_tok_s"]
                theirs = llama_decode_tok_s()
                row = {
                    "round": r + 1,
                    "dtype": dtype,
                    "serve_args": " ".join(serve_args),
                    "output_len": output_len,
                    "radixserve_bs1_decode_tok_s": round(ours, 1),
                    "llama_cpp_bs1_decode_tok_s": round(theirs, 1),
                    "ratio": round(ours / theirs, 3),
                    "load_average_1min": os.getloadavg()[0],
                }
                print(json.dumps(row), flush=True)
        finally:
            stop_stack(stack)


def stack_cpu_seconds(stack) -> dict[str, float]:
    """CPU seconds (user + system) so far of each process of the stack's session, by service name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) != stack.proc.pid:  # session id: the launcher started a new session
            continue
        names = [c.decode() for c in cmd]
        name = names[names.index("radixserve.cli") + 1] if "radixserve.cli" in names else names[0]
        name = "launcher" if name == "serve" else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_breakdown(dtype: str, output_len: int, rounds: int, serve_args: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack("--dtype", dtype, *serve_args, log_path=f"{tmp}/serve.log")
        try:
            stream_one(stack.base_url, 8)  # warm-up
            for r in range(rounds):
                before = stack_cpu_seconds(stack)
                run = stream_one(stack.base_url, output_len)
                after = stack_cpu_seconds(stack)
                n = run["completion_tokens"]
                per_token = {
                    k: round((after[k] - before.get(k, 0.0)) * 1e3 / n, 3) for k in sorted(after)
                }
                services = sum(v for k, v in per_token.items() if k != "executor")
                row = {
                    "round": r + 1,
                    "dtype": dtype,
                    "output_len": output_len,
                    "bs1_decode_tok_s": round(run["decode_tok_s"], 1),
                    "wall_ms_per_token": round(1e3 / run["decode_tok_s"], 3),
                    "cpu_ms_per_token": per_token,
                    "services_cpu_ms_per_token": round(services, 3),
                    "load_average_1min": os.getloadavg()[0],
                }
                print(json.dumps(row), flush=True)
        finally:
            stop_stack(stack)


def start_stack_with(python: str, dtype: str, serve_args: list[str], log_path: str):
    """start_stack, the services started by `python` (another checkout's venv) instead of this one."""
    real = sys.executable
    sys.executable = python
    try:
        return start_stack("--dtype", dtype, *serve_args, log_path=log_path)
    finally:
        sys.executable = real


def concurrent_tok_s(base_url: str, output_len: int, concurrency: int) -> float:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        runs = list(
            pool.map(
                lambda i: stream_one(base_url, output_len, f"{PROMPT} ({i})"), range(concurrency)
            )
        )
    return sum(r["completion_tokens"] for r in runs) / (time.perf_counter() - t0)


def side_by_side(
    dtype: str, output_len: int, concurrency: int, rounds: int, base_python: str, serve_args
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stacks = {
            "new": start_stack_with(sys.executable, dtype, serve_args, f"{tmp}/new.log"),
            "base": start_stack_with(base_python, dtype, serve_args, f"{tmp}/base.log"),
        }
        try:
            for stack in stacks.values():
                stream_one(stack.base_url, 8)  # warm-up
            for r in range(rounds):
                row = {"round": r + 1, "dtype": dtype, "output_len": output_len}
                order = ("base", "new") if r % 2 == 0 else ("new", "base")
                bs1 = {name: [] for name in order}
                for _ in range(BS1_PER_ROUND):
                    for name in order:
                        bs1[name].append(stream_one(stacks[name].base_url, output_len))
                for name in order:
                    row[f"{name}_bs1_decode_tok_s"] = round(
                        statistics.median(r["decode_tok_s"] for r in bs1[name]), 1
                    )
                for name in order:
                    row[f"{name}_concurrent_output_tok_s"] = round(
                        concurrent_tok_s(stacks[name].base_url, output_len, concurrency), 1
                    )
                for key in ("bs1_decode_tok_s", "concurrent_output_tok_s"):
                    row[f"ratio_{key}"] = round(row[f"new_{key}"] / row[f"base_{key}"], 3)
                row["load_average_1min"] = os.getloadavg()[0]
                print(json.dumps(row), flush=True)
        finally:
            for stack in stacks.values():
                stop_stack(stack)


def hf_baseline(dtype: str, output_len: int) -> dict:
    """HF transformers generate() at batch 1 on the same converted weights, for a side-by-side ratio."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from radixserve.common.model_files import resolve_model_path

    folder = resolve_model_path(None)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    ids = torch.tensor([AutoTokenizer.from_pretrained(folder)(PROMPT)["input_ids"]])

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    timed(4)  # warm-up
    one, full = timed(1), timed(output_len)
    return {
        "baseline": "hf-transformers generate",
        "dtype": dtype,
        "output_len": output_len,
        "bs1_decode_tok_s": round((output_len - 1) / (full - one), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--hf-baseline", action="store_true", help="also time HF transformers at batch 1"
    )
    p.add_argument("--serve-args", default="", help="extra `radixserve serve` flags, one string")
    p.add_argument("--llama-cpp-rounds", type=int, default=0)
    p.add_argument("--cpu-breakdown", type=int, default=0, metavar="N")
    p.add_argument("--baseline-python", help="side by side with the stack this python starts")
    p.add_argument("--rounds", type=int, default=3, help="with --baseline-python")
    a = p.parse_args()
    if a.baseline_python:
        for dtype in a.dtypes:
            side_by_side(
                dtype,
                a.output_len,
                a.concurrency,
                a.rounds,
                a.baseline_python,
                a.serve_args.split(),
            )
        return
    if a.cpu_breakdown:
        for dtype in a.dtypes:
            cpu_breakdown(dtype, a.output_len, a.cpu_breakdown, a.serve_args.split())
        return
    if a.llama_cpp_rounds:
        for dtype in a.dtypes:
            llama_cpp_side_by_side(dtype, a.output_len, a.llama_cpp_rounds, a.serve_args.split())
        return
    for dtype in a.dtypes:
        print(
            json.dumps(bench(dtype, a.output_len, a.concurrency, a.serve_args.split())), flush=True
        )
        if a.hf_baseline:
            print(json.dumps(hf_baseline(dtype, a.output_len)), flush=True)


if __name__ == "__main__":
    main()
