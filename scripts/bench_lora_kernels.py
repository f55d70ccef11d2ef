"""The multi-LoRA kernels (kernels/lora.py) against the base GEMMs they ride on, on a GPU.

Llama-3-8B's four LoRA'd linears (qkv, o, gate_up, down) at rank 16 with 16 adapters in the batch: for
each step size, the base GEMMs' time (torch.mm over bf16 weights), the shrink + expand time with the
default launch (launch_for) and its ratio to the base, and with --sweep the fastest launch of each
kernel per target from a grid of tile sizes, K chunks, output blocks and warps (what launch_for's
classes are chosen from). Decode-sized steps lay tokens out by adapter (as the batch builder does);
prefill-sized ones in runs of 512 tokens (one request's prompt each), cycling the adapters.

  python scripts/bench_lora_kernels.py                # default launches
  python scripts/bench_lora_kernels.py --sweep        # + the grid (compiles ~130 variants first)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch

from radixserve.kernels import lora

# (name, K, N, stacked R) of Llama-3-8B at rank 16: q/k/v and gate/up stack their shards' A
TARGETS = [
    ("qkv", 4096, 6144, 48),
    ("o", 4096, 4096, 16),
    ("gate_up", 4096, 28672, 32),
    ("down", 14336, 4096, 16),
]


def timed(fn, reps: int) -> float:
    """Mean ms of fn over reps calls (after two untimed)."""
    fn(), fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def token_slots(T: int, adapters: int, prompt_len: int = 512) -> torch.Tensor:
    if T <= 256:  # a decode batch, laid out by adapter
        slots = sorted(i % adapters for i in range(T))
    else:  # prefill chunks: runs of one request's prompt
        slots = [(i // prompt_len) % adapters for i in range(T)]
    return torch.tensor(slots, device="cuda", dtype=torch.int64)


def sweep_launches(T: int):
    programs = (16, 1) if T <= lora.FEW_TOKENS else (1,)
    shrink = [
        lora.Launch(block_t=bt, programs=p, k_chunk=kc, block_n=64, num_warps=w)
        for bt, p, kc, w in itertools.product((16, 32, 64), programs, (256, 1024, 4096), (4, 8))
    ]
    expand = [
        lora.Launch(block_t=bt, programs=p, k_chunk=256, block_n=bn, num_warps=w)
        for bt, p, bn, w in itertools.product((16, 32, 64), programs, (64, 128, 256), (4, 8))
    ]
    return shrink, expand


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096, 8192])
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    S = args.adapters
    weights = {
        name: (
            torch.randn(N, K, device=dev, dtype=dt) * K**-0.5,
            torch.randn(S, R, K, device=dev, dtype=dt) * K**-0.5,
            torch.randn(S, N, R, device=dev, dtype=dt) * R**-0.5,
        )
        for name, K, N, R in TARGETS
    }
    scales = torch.full((S,), 2.0, device=dev)
    print(f"# {torch.cuda.get_device_name()}, {S} adapters, rank 16, bf16", flush=True)
    for T in args.tokens:
        slots = token_slots(T, S)
        row = {"tokens": T, "base_ms": 0.0, "lora_ms": 0.0, "best_lora_ms": 0.0, "best": {}}
        for name, K, N, R in TARGETS:
            w, a, b = weights[name]
            x = torch.randn(T, K, device=dev, dtype=dt)
            y = torch.mm(x, w.t())
            s = lora.lora_shrink(x, a, slots)
            row["base_ms"] += timed(lambda: torch.mm(x, w.t()), args.reps)
            shrink_ms = timed(lambda: lora.lora_shrink(x, a, slots), args.reps)
            expand_ms = timed(lambda: lora.lora_expand(y, s, b, scales, slots), args.reps)
            row["lora_ms"] += shrink_ms + expand_ms
            if not args.sweep:
                continue
            shrinks, expands = sweep_launches(T)
            best_s = min(
                (
                    (timed(lambda c=c: lora.lora_shrink(x, a, slots, c), args.reps), c)
                    for c in shrinks
                ),
                key=lambda pair: pair[0],
            )
            best_e = min(
                (
                    (timed(lambda c=c: lora.lora_expand(y, s, b, scales, slots, c), args.reps), c)
                    for c in expands
                ),
                key=lambda pair: pair[0],
            )
            row["best_lora_ms"] += best_s[0] + best_e[0]
            row["best"][name] = {
                "shrink": [round(shrink_ms, 4), round(best_s[0], 4), dataclasses.asdict(best_s[1])],
                "expand": [round(expand_ms, 4), round(best_e[0], 4), dataclasses.asdict(best_e[1])],
            }
        row["ratio"] = row["lora_ms"] / row["base_ms"]
        if args.sweep:
            row["best_ratio"] = row["best_lora_ms"] / row["base_ms"]
        print(
            f"T={T:5d} base {row['base_ms']:.3f} ms  lora {row['lora_ms']:.3f} ms "
            f"({row['ratio']:.1%} of base)"
            + (f"  best {row['best_lora_ms']:.3f} ({row['best_ratio']:.1%})" if args.sweep else ""),
            flush=True,
        )
        if args.sweep:
            print(json.dumps(row["best"]), flush=True)


if __name__ == "__main__":
    main()
