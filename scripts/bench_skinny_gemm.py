"""cuBLAS (torch.nn.functional.linear) vs the Triton skinny GEMM (kernels/skinny_gemm.py) on the
Llama-3-8B decode GEMMs, bf16, at M = 1..16 rows.

  python scripts/bench_skinny_gemm.py --out skinny.jsonl            # under a minute on an H100
  python scripts/bench_skinny_gemm.py --m 1 8 --sweep               # also time every config of the kernel

Timing: each implementation's calls are captured in one CUDA graph (no launch overhead, as in the
executor's decode graphs) that cycles over enough copies of the weight to exceed L2 (50 MB on an
H100: o_proj's 32 MB would otherwise be read from L2), replayed several times; the median replay over
the calls in it is the time of one call. GB/s counts the weight bytes (N * K * 2) only.

One JSON line per (M, shape): us, weight GB/s for both, speedup (cublas_us / skinny_us), max abs error
of the kernel vs torch, the autotuned config, the first call's seconds (compile + autotune); then one
summary line per M: a 32-layer decode step's GEMMs (32 * (qkv + o + gate_up + down) + lm_head) for each
implementation. --out also writes the lines. Needs the repo on the path (PYTHONPATH=. or pip install -e .).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from radixserve.kernels import skinny_gemm as sg

SHAPES = {  # Llama-3-8B, tp=1: name -> (N, K)
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
LAYERS = 32
L2_FLUSH_BYTES = 3 * 50 * 2**20  # the rotated weight copies together exceed L2 three times over


def graph_time_us(fn, weights: list[torch.Tensor], calls: int, replays: int = 7) -> float:
    """Median time of one call of fn(w), from CUDA-graph replays of `calls` calls cycling over weights."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, autotune) outside the capture
        for w in weights:
            fn(w)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    del graph
    return statistics.median(times)


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written: the practical bandwidth ceiling."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = graph_time_us(lambda w: b.copy_(w), [a], calls=10)
    return 2 * a.numel() / us / 1e3


def config_str(c) -> str:
    if c is None:
        return "?"
    kw = c.kwargs if hasattr(c, "kwargs") else {k: v for k, v in c.items() if k.startswith("BLOCK")}
    nw = c.num_warps if hasattr(c, "num_warps") else c["num_warps"]
    ns = c.num_stages if hasattr(c, "num_stages") else c["num_stages"]
    return f"BN{kw['BLOCK_N']}_BK{kw['BLOCK_K']}_w{nw}_s{ns}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument(
        "--sweep", action="store_true", help="also time each config of the kernel's config list"
    )
    p.add_argument(
        "--config",
        nargs="+",
        default=[],
        metavar="BN,BK,WARPS,STAGES",
        help="with --sweep: more configs to time (M == 1: gemv ones, M > 1: dot ones; prefix g: or d:)",
    )
    p.add_argument("--out", help="also write the JSON lines to this file")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    dtype = torch.bfloat16
    lines = []

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        lines.append(line)

    props = torch.cuda.get_device_properties(0)
    emit(
        {
            "device": props.name,
            "sms": props.multi_processor_count,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "copy_gbps": round(copy_bandwidth_gbps(), 1),
        }
    )
    per_m: dict[int, dict[str, tuple[float, float]]] = {m: {} for m in args.m}
    for name in args.shapes:
        N, K = SHAPES[name]
        nbytes = N * K * 2
        copies = max(1, math.ceil(L2_FLUSH_BYTES / nbytes))
        weights = [torch.randn(N, K, device="cuda", dtype=dtype) * K**-0.5 for _ in range(copies)]
        calls = copies * max(1, math.ceil(max(20, 2e9 / nbytes) / copies))
        for m in args.m:
            x = torch.randn(m, K, device="cuda", dtype=dtype)
            ref = F.linear(x, weights[0])
            t0 = time.perf_counter()
            got = sg.skinny_gemm(x, weights[0])  # compiles and autotunes this (M bucket, N, K)
            torch.cuda.synchronize()
            first_call_s = time.perf_counter() - t0
            err = (got.float() - ref.float()).abs().max().item()
            chosen = config_str(sg.tuned_config(m))
            t_cublas = graph_time_us(lambda w: F.linear(x, w), weights, calls)
            t_skinny = graph_time_us(lambda w: sg.skinny_gemm(x, w), weights, calls)
            per_m[m][name] = (t_cublas, t_skinny)
            rec = {
                "M": m,
                "shape": name,
                "N": N,
                "K": K,
                "cublas_us": round(t_cublas, 2),
                "skinny_us": round(t_skinny, 2),
                "cublas_gbps": round(nbytes / t_cublas / 1e3, 1),
                "skinny_gbps": round(nbytes / t_skinny / 1e3, 1),
                "speedup": round(t_cublas / t_skinny, 3),
                "max_abs_err": err,
                "max_abs_ref": ref.abs().max().item(),
                "config": chosen,
                "first_call_s": round(first_call_s, 2),
            }
            if args.sweep:
                sweep = {}
                cfgs = [
                    {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                    for c in (sg.GEMV_CONFIGS if m == 1 else sg.DOT_CONFIGS)
                ]
                for spec in args.config:
                    kind, _, nums = spec.rpartition(":")
                    if kind in ("", "g" if m == 1 else "d"):
                        bn, bk, nw, ns = map(int, nums.split(","))
                        cfgs.append(
                            {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
                        )
                for cfg in cfgs:
                    try:
                        us = graph_time_us(
                            lambda w: sg.skinny_gemm(x, w, config=cfg), weights, calls
                        )
                        sweep[config_str(cfg)] = round(us, 2)
                    except Exception as e:  # noqa: BLE001 - out of resources etc.: report, go on
                        sweep[config_str(cfg)] = f"{type(e).__name__}"
                rec["sweep_us"] = sweep
            emit(rec)
        del weights
        torch.cuda.empty_cache()

    for m in args.m:
        t = per_m[m]
        if all(s in t for s in SHAPES):
            step = [
                LAYERS * sum(t[s][i] for s in ("qkv", "o", "gate_up", "down")) + t["lm_head"][i]
                for i in (0, 1)
            ]
            emit(
                {
                    "summary": "decode_step_gemms",
                    "M": m,
                    "layers": LAYERS,
                    "cublas_ms": round(step[0] / 1e3, 3),
                    "skinny_ms": round(step[1] / 1e3, 3),
                    "speedup": round(step[0] / step[1], 3),
                }
            )
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
