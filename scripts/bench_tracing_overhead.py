"""Cost of tracing: bs1 decode through the five-process stack with tracing off, then on at sample
ratio 1.0 exporting to a real OTLP receiver (tests/otlp_receiver.py), on the embedded SmolLM2.

Prints one JSON line per configuration and the ratio. Each run: a warm-up request, then --runs
sequential /generate requests of --output-len tokens; the median decode tok/s is reported.
Usage: python scripts/bench_tracing_overhead.py [--output-len 128] [--runs 5] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from scripts.bench_cpu import stream_one  # noqa: E402
from tests.otlp_receiver import start_receiver  # noqa: E402
from tests.stack import start_stack, stop_stack  # noqa: E402


def run(flags: list[str], output_len: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(*flags, log_path=f"{tmp}/serve.log")
        try:
            stream_one(stack.base_url, 8)
            results = [stream_one(stack.base_url, output_len) for _ in range(runs)]
        finally:
            stop_stack(stack)
    return {
        "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in results), 2),
        "ttft_ms": round(statistics.median(r["ttft_s"] for r in results) * 1e3, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    a = parser.parse_args()
    base = ["--dtype", a.dtype]
    off = run(base, a.output_len, a.runs)
    print(json.dumps({"tracing": "off", **off}), flush=True)
    receiver = start_receiver()
    try:
        on = run(
            [*base, "--otlp-traces-endpoint", receiver.endpoint, "--trace-sample-ratio", "1.0"],
            a.output_len,
            a.runs,
        )
        spans = len(receiver.snapshot())
    finally:
        receiver.stop()
    print(json.dumps({"tracing": "on, ratio 1.0", **on, "spans_received": spans}), flush=True)
    print(
        json.dumps(
            {
                "decode_tok_s_on_over_off": round(on["decode_tok_s"] / off["decode_tok_s"], 4),
                "ttft_on_over_off": round(on["ttft_ms"] / off["ttft_ms"], 4),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
