"""Where a CUDA-graph decode step's time goes: the whole step (build, replay, sample) vs the graph's
GPU time alone (back-to-back replays), and the GPU kernels of one replay by total time.

  python scripts/profile_decode.py --model-path .models/llama-3-8b --batch-size 1 128
  python scripts/profile_decode.py --model-path .models/llama-3-8b --quantization fp8 --rows 40
"""

from __future__ import annotations

import argparse
import json

import torch

from radixserve.bench.one_batch import InProcessTarget, run_once
from radixserve.common.args import ServerArgs


def graph_gpu_ms(graph: torch.cuda.CUDAGraph, replays: int = 20) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def kernel_table(graph: torch.cuda.CUDAGraph, replays: int = 5, rows: int = 14) -> list:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted(
        (
            (e.key, e.device_time_total / replays / 1000, e.count // replays)
            for e in prof.key_averages()
        ),
        key=lambda k: -k[1],
    )[:rows]
    return [(name[:70], round(ms, 4), n) for name, ms, n in kernels]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", required=True)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--quantization", default=None, help="e.g. fp8 (default: the checkpoint's)")
    p.add_argument("--rows", type=int, default=14, help="kernels listed, longest first")
    a = p.parse_args()
    target = InProcessTarget(
        ServerArgs(
            model_path=a.model_path,
            dtype="bfloat16",
            device="cuda",
            load_format="dummy",
            max_total_tokens=200_000,
            cuda_graph_max_bs=max(a.batch_size),
            quantization=a.quantization,
        )
    )
    graphs = target.runner.cuda_graphs
    for bs in a.batch_size:
        # The graph's static buffers keep this batch's last step, so its replays redo that step.
        step = run_once(target, bs, a.input_len, a.steps, seed=1)
        graph = graphs.graphs[next(b for b in graphs.buckets if b >= bs)]
        print(
            json.dumps(
                {
                    "batch_size": bs,
                    "step_wall_ms_median": 1000 * step["median_decode_latency"],
                    "graph_replay_gpu_ms": graph_gpu_ms(graph),
                    "kernels_ms_per_step": kernel_table(graph, rows=a.rows),
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
