"""Decode-step timing of the ModelRunner, in process (no gRPC).

python -m services.executor.bench --dtype bfloat16 --batch 1 16 --prompt-len 128 --steps 40
"""
from __future__ import annotations

import argparse
import statistics

from services.common.args import ServerArgs
from services.executor.runner import build_model_runner
from services.executor.step_io import ContinuingRequest, NewRequest, StepInput


def time_decode(runner, batch: int, prompt_len: int, steps: int, profile: bool = False) -> float:
    """Median ms per decode step of `batch` requests, after prefilling each with prompt_len tokens."""
    runner.reset()
    next_slot = 1
    new = []
    for b in range(batch):
        slots = list(range(next_slot, next_slot + prompt_len))
        next_slot += prompt_len
        new.append(NewRequest(f"r{b}", [(7 * b + i) % 1000 + 10 for i in range(prompt_len)], slots))
    runner.step(StepInput(0, new_requests=new))
    times = []
    prof = None
    for s in range(steps):
        cont = [ContinuingRequest(f"r{b}", [next_slot + b]) for b in range(batch)]
        next_slot += batch
        if profile and s == steps - 5:
            import torch.profiler
            prof = torch.profiler.profile()
            prof.__enter__()
        times.append(runner.step(StepInput(s + 1, continuing_requests=cont)).forward_ms)
    if prof is not None:
        prof.__exit__(None, None, None)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return statistics.median(times[3:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--load-format", default="auto", help="dummy: random weights (for model folders with only config.json)")
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    runner = build_model_runner(ServerArgs(model_path=a.model_path, dtype=a.dtype, load_format=a.load_format,
                                             max_total_tokens=a.max_total_tokens))
    for batch in a.batch:
        ms = time_decode(runner, batch, a.prompt_len, a.steps, a.profile)
        print(f"dtype={a.dtype} batch={batch} prompt_len={a.prompt_len}: {ms:.1f} ms/step, "
              f"{1000 * batch / ms:.0f} tok/s")


if __name__ == "__main__":
    main()
