"""Where a CUDA-graph decode step's time goes: the whole step (build, replay, sample) vs the graph's
GPU time alone (back-to-back replays), and the GPU kernels of one replay by total time.

  python scripts/profile_decode.py --model-path .models/llama-3-8b --batch-size 1 128
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from services.executor.runner import ModelRunner
from services.executor.step_io import ContinuingRequest, NewRequest, StepInput


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", required=True)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    runner = ModelRunner(a.model_path, dtype="bfloat16", device="cuda", load_format="dummy",
                         max_total_tokens=200_000, cuda_graph_max_bs=max(a.batch_size))
    for bs in a.batch_size:
        runner.reset()
        span = a.input_len + a.steps + 1
        new = [NewRequest(f"r{b}", [100 + b] * a.input_len, list(range(1 + b * span, 1 + b * span + a.input_len)))
               for b in range(bs)]
        runner.step(StepInput(1, new_requests=new))
        walls = []
        for s in range(a.steps):
            cont = [ContinuingRequest(f"r{b}", [1 + b * span + a.input_len + s]) for b in range(bs)]
            t0 = time.perf_counter()
            runner.step(StepInput(2 + s, continuing_requests=cont))
            walls.append(time.perf_counter() - t0)
        graphs = runner.cuda_graphs
        bucket = next(b for b in graphs.buckets if b >= bs)
        graph = graphs.graphs[bucket]
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        replay_ms = start.elapsed_time(end) / 20
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        kernels = sorted(((e.key, e.device_time_total / 5 / 1000, e.count // 5) for e in prof.key_averages()),
                         key=lambda k: -k[1])[:14]
        print(json.dumps({"batch_size": bs, "step_wall_ms_median": 1000 * statistics.median(walls[3:]),
                          "graph_replay_gpu_ms": replay_ms,
                          "kernels_ms_per_step": [(k[:70], round(ms, 4), n) for k, ms, n in kernels]}, indent=1))


if __name__ == "__main__":
    main()
