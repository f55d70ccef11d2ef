"""Batch-1 decode tok/s straight from the scheduler's token-level Generate stream (no gateway, no
detokenizer): isolates the scheduler <-> executor path. Starts the five-process stack.

Usage: python scripts/bench_scheduler_direct.py [--dtype bfloat16] [--output-len 128] [extra serve flags...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from radixserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc  # noqa: E402
from tests.stack import start_stack, stop_stack  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--output-len", type=int, default=128)
    a, extra = p.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack("--dtype", a.dtype, *extra, log_path=f"{tmp}/serve.log")
        try:
            with grpc.insecure_channel(stack.scheduler_addr) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                rates = []
                for rep in range(3):
                    req = scheduler_pb2.SchedulerGenerateRequest(
                        request_id=f"probe-{rep}",
                        input_ids=list(range(100, 228)),
                        sampling=common_pb2.SamplingParams(temperature=0),
                        stopping=common_pb2.StoppingCriteria(
                            max_new_tokens=a.output_len, ignore_eos=True
                        ),
                    )
                    stamps = [time.perf_counter() for _ in stub.Generate(req)]
                    rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        finally:
            stop_stack(stack)
    print(
        json.dumps(
            {"dtype": a.dtype, "flags": extra, "bs1_decode_tok_s": [round(r, 1) for r in rates]}
        )
    )


if __name__ == "__main__":
    main()
