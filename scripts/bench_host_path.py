"""The host path alone: CPU time each process spends per output token under the rate-inf load.

Serves a tiny random Llama (2 layers, hidden 64, vocab 4096) on the CPU, so the model costs next to
nothing and what is left is the host work of every step: planning and converting it (scheduler),
building the batch and sampling (executor), fanning tokens out (scheduler session, gateway SSE) and
reading them (the benchmark client). Runs `radixserve bench serving` (random ids, rate inf) and reads
each process's CPU seconds from /proc before and after.

Usage: python scripts/bench_host_path.py [--num-prompts 256] [--input-len 512] [--output-len 256]
Prints one JSON line: output tok/s and CPU microseconds per output token for each process.
The figure to compare between commits is the per-token CPU of each process (wall-clock throughput on
a 2-core machine mostly says which processes share a core).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

SERVICES = ("gateway", "scheduler", "executor")
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_pids() -> dict[str, int]:
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        for name in SERVICES:
            if (
                b"radixserve.cli" in argv
                and name.encode() in argv[argv.index(b"radixserve.cli") + 1 :][:1]
            ):
                pids[name] = int(entry)
    return pids


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError("the server did not become ready")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--port", type=int, default=31100)
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy each service over the run into DIR/spy-NAME.txt (raw)",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/config.json", "w") as f:
            json.dump(TINY_LLAMA, f)
        base = args.port
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "radixserve.cli",
                "serve",
                "--model-path",
                tmp,
                "--load-format",
                "dummy",
                "--dtype",
                "float32",
                "--skip-tokenizer-init",
                "--max-total-tokens",
                "400000",
                "--port",
                str(base),
                "--gateway-grpc-port",
                str(base + 1),
                "--tokenizer-addr",
                f"127.0.0.1:{base + 2}",
                "--scheduler-addr",
                f"127.0.0.1:{base + 3}",
                "--executor-addr",
                f"127.0.0.1:{base + 4}",
                "--detokenizer-addr",
                f"127.0.0.1:{base + 5}",
            ],
            stdout=open(f"{tmp}/serve.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{base}"
            wait_ready(url, serve)
            pids = service_pids()
            bench = [
                sys.executable,
                "-m",
                "radixserve.cli",
                "bench",
                "serving",
                "--base-url",
                url,
                "--backend",
                "radixserve",
                "--dataset",
                "random-ids",
                "--random-range-ratio",
                "1.0",
                "--random-input-len",
                str(args.input_len),
                "--random-output-len",
                str(args.output_len),
                "--num-prompts",
                str(args.num_prompts),
                "--request-rate",
                "inf",
                "--disable-tqdm",
                "--output-file",
                f"{tmp}/result.jsonl",
            ]
            spies = []
            if args.profile:
                os.makedirs(args.profile, exist_ok=True)
                spies = [
                    subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "-r",
                            "200",
                            "--format",
                            "raw",
                            "-o",
                            f"{args.profile}/spy-{name}.txt",
                            "-p",
                            str(pid),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for name, pid in pids.items()
                ]
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = time.perf_counter()
            with open(f"{tmp}/client.log", "w") as log:
                client = subprocess.Popen(bench, stdout=log, stderr=subprocess.STDOUT)
                _, status, usage = os.wait4(client.pid, 0)
            wall = time.perf_counter() - t0
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            after = {name: cpu_seconds(pid) for name, pid in pids.items()}
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(open(f"{tmp}/client.log").read()[-3000:])
            result = json.loads(open(f"{tmp}/result.jsonl").read().splitlines()[-1])
        except BaseException:
            sys.stderr.write(open(f"{tmp}/serve.log").read()[-4000:])
            raise
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(60)
    tokens = result["total_output_tokens"]
    per_token = {name: round((after[name] - before[name]) / tokens * 1e6, 1) for name in pids}
    per_token["client"] = round((usage.ru_utime + usage.ru_stime) / tokens * 1e6, 1)
    print(
        json.dumps(
            {
                "num_prompts": args.num_prompts,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "output_tokens": tokens,
                "wall_s": round(wall, 2),
                "output_tok_s": round(result["output_throughput"], 1),
                "cpu_us_per_output_token": per_token,
            }
        )
    )


if __name__ == "__main__":
    main()
