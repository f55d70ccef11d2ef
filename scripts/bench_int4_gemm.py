"""The int4 weight-only kernels (kernels/int4_gemm.py) against bf16 (the Triton skinny GEMM at M <= 16,
cuBLAS above) on the Llama-3-8B linears, and a correctness check of each against the torch reference.

  python scripts/bench_int4_gemm.py --out int4.jsonl                 # a few minutes on an H100
  python scripts/bench_int4_gemm.py --m 1 16 --sweep                 # also time alternative configs
  python scripts/bench_int4_gemm.py --m 1 --config 1,32,512,4,3      # time extra configs (BM,BN,BK,W,S)
  python scripts/bench_int4_gemm.py --m 1 --out int4_gemv.jsonl     # + the GEMV kernels side by side

Weights: random codes, zeros and group-128 scales in the kernels' layout (what `--load-format dummy
--quantization awq` serves). Timing as scripts/bench_skinny_gemm.py: the calls of each implementation in
one CUDA graph cycling over enough weight copies to exceed L2, median replay per call. TB/s counts the
int4 weight's bytes (codes + scales + zeros) for int4 and the bf16 weight's for bf16.

One JSON line per (M, shape): bf16_us, tiled_us (the tiled / GEMV kernel), dequant_cublas_us (M >= 256:
dequantize to bf16 once + cuBLAS), served_us (kernels/int4_gemm.int4_linear, what the executor runs),
TB/s of each, the relative error against the reference; then per M the 32-layer step's GEMMs (qkv + o
+ gate_up + down per layer, plus the bf16 lm_head). At M = 1 each GEMV kernel of --gemv (default: all of
kernels/int4_gemm.GEMV_KERNELS: half2, half2_late, float32) is also timed on the same weights and x,
one after the other per shape: gemv_<kernel>_us / _tbps / _err per shape; the step_gemms line then adds
gemv_<kernel>_ms (32 layers + bf16 lm_head), gemv_<kernel>_layers_ms (int4 layers only) and
<kernel>_speedup (float32 layers_ms / that kernel's layers_ms).
Needs the repo on the path (pip install -e .).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_skinny_gemm import L2_FLUSH_BYTES, LAYERS, SHAPES, copy_bandwidth_gbps, graph_time_us  # noqa: E402

from radixserve.kernels import int4_gemm as ig  # noqa: E402
from radixserve.kernels import skinny_gemm as sg  # noqa: E402

GROUP = 128
SWEEP = {  # M class -> alternatives to the class's config (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    1: [
        (1, 8, 1024, 2, 1, 1),  # the class's config without splitting K
        (1, 8, 512, 2, 2),
        (1, 16, 512, 2, 2),
        (1, 32, 256, 2, 3),
        (1, 32, 512, 4, 2),
        (1, 64, 256, 4, 2),
        (1, 16, 1024, 4, 1),
    ],
    16: [(16, 32, 512, 4, 3), (16, 16, 256, 2, 4), (16, 64, 256, 4, 3)],
    64: [(64, 128, 128, 4, 3), (32, 64, 256, 4, 3)],
    None: [(128, 64, 256, 4, 3), (64, 128, 256, 4, 3), (128, 256, 128, 8, 3)],
}


def random_int4(n: int, k: int, g: torch.Generator) -> ig.Int4Weight:
    words = torch.randint(0, 2**32, (n, ig.padded(k) // 8), generator=g, device="cuda")
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    groups = k // GROUP
    scales = (torch.rand(groups, n, generator=g, device="cuda") * 0.004 + 0.001).half()
    zeros = torch.randint(0, 16, (groups, n), generator=g, device="cuda").to(torch.uint8)
    return ig.Int4Weight(packed, scales, zeros, k, GROUP)


def as_config(spec) -> dict:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, SPLIT_K of the GEMV; else chosen per shape])."""
    bm, bn, bk, nw, ns, *split = spec
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
    return cfg | ({"SPLIT_K": split[0]} if split else {})


def config_str(c: dict) -> str:
    split = f"_split{c['SPLIT_K']}" if "SPLIT_K" in c else ""
    return "BM{BLOCK_M}_BN{BLOCK_N}_BK{BLOCK_K}_w{num_warps}_s{num_stages}".format(**c) + split


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 16, 256, 8192])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--sweep", action="store_true", help="also time the SWEEP configs of each class")
    p.add_argument("--config", nargs="+", default=[], metavar="BM,BN,BK,WARPS,STAGES[,SPLIT_K]")
    p.add_argument("--gemv", nargs="+", default=list(ig.GEMV_KERNELS), choices=ig.GEMV_KERNELS)
    p.add_argument("--out", help="also write the JSON lines to this file")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    g = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.bfloat16
    lines: list[str] = []

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        lines.append(line)

    props = torch.cuda.get_device_properties(0)
    emit({"device": props.name, "copy_gbps": round(copy_bandwidth_gbps(), 1)})
    step: dict[int, dict[str, dict[str, float]]] = {m: {} for m in args.m}
    for name in args.shapes:
        N, K = SHAPES[name]
        bf16_bytes = N * K * 2
        bf16 = [
            torch.randn(N, K, device="cuda", dtype=dtype) * K**-0.5
            for _ in range(max(1, math.ceil(L2_FLUSH_BYTES / bf16_bytes)))
        ]
        quantized = name != "lm_head"  # checkpoints keep the LM head in bf16
        int4 = []
        if quantized:
            one = random_int4(N, K, g)
            int4 = [one] + [
                random_int4(N, K, g) for _ in range(math.ceil(L2_FLUSH_BYTES / one.nbytes()) - 1)
            ]
            deq = ig.dequantize_reference(int4[0]).to("cuda")
        for m in args.m:
            x = torch.randn(m, K, device="cuda", dtype=dtype)
            calls = max(4, min(200, math.ceil(4e9 / max(bf16_bytes, m * N * K * 2 / 100))))

            def bf16_fn(w, x=x, m=m):
                return sg.skinny_gemm(x, w) if m <= sg.M_MAX else F.linear(x, w)

            rec = {"M": m, "shape": name, "N": N, "K": K}
            t = graph_time_us(bf16_fn, bf16, calls)
            rec["bf16_us"], rec["bf16_tbps"] = round(t, 2), round(bf16_bytes / t / 1e6, 3)
            times = {"bf16": t}
            if quantized:
                nbytes = int4[0].nbytes()
                ref = F.linear(x.float(), deq).to(dtype)
                t0 = time.perf_counter()
                got = ig.int4_gemm(x, int4[0])
                torch.cuda.synchronize()
                rec["first_call_s"] = round(time.perf_counter() - t0, 2)
                rec["tiled_err"] = rel_err(got, ref)
                rec["served_err"] = rel_err(ig.int4_linear(x, int4[0]), ref)
                rec["config"] = config_str(ig.config_for(m))
                impls = {"tiled": lambda w, x=x: ig.int4_gemm(x, w)}
                if m >= 256:
                    impls["dequant_cublas"] = lambda w, x=x: F.linear(x, ig.dequantize(w, dtype))
                impls["served"] = lambda w, x=x: ig.int4_linear(x, w)
                for impl, fn in impls.items():
                    t = graph_time_us(fn, int4, calls)
                    rec[f"{impl}_us"], rec[f"{impl}_tbps"] = round(t, 2), round(nbytes / t / 1e6, 3)
                    times[impl] = t
                rec["speedup_vs_bf16"] = round(rec["bf16_us"] / rec["served_us"], 3)
                for choice in args.gemv if m == 1 else ():  # the GEMV kernels side by side
                    cfg = {**ig.config_for(1), "GEMV": choice}
                    rec[f"gemv_{choice}_err"] = rel_err(ig.int4_gemm(x, int4[0], config=cfg), ref)
                    t = graph_time_us(
                        lambda w, x=x, c=cfg: ig.int4_gemm(x, w, config=c), int4, calls
                    )
                    rec[f"gemv_{choice}_us"] = round(t, 2)
                    rec[f"gemv_{choice}_tbps"] = round(nbytes / t / 1e6, 3)
                    times[f"gemv_{choice}"] = t
                specs = [tuple(map(int, c.split(","))) for c in args.config]
                if args.sweep:
                    largest = next(c for c, cfg in ig.M_CLASSES if cfg is ig.config_for(m))
                    specs += SWEEP[largest]
                sweep = {}
                for spec in specs:
                    cfg = as_config(spec)
                    try:
                        err = rel_err(ig.int4_gemm(x, int4[0], config=cfg), ref)
                        us = graph_time_us(
                            lambda w, x=x: ig.int4_gemm(x, w, config=cfg), int4, calls
                        )
                        sweep[config_str(cfg)] = {"us": round(us, 2), "err": err}
                    except Exception as e:  # noqa: BLE001 - out of resources etc.: report, go on
                        sweep[config_str(cfg)] = type(e).__name__
                if sweep:
                    rec["sweep"] = sweep
            step[m][name] = times
            emit(rec)
        del bf16, int4
        torch.cuda.empty_cache()

    for m in args.m:
        t = step[m]
        if all(s in t for s in SHAPES):
            layer = ("qkv", "o", "gate_up", "down")
            rec = {"summary": "step_gemms", "M": m, "layers": LAYERS}
            impls = ["bf16", "served"] + [f"gemv_{c}" for c in args.gemv if m == 1]
            for impl in impls:
                total = LAYERS * sum(t[s][impl] for s in layer) + t["lm_head"]["bf16"]
                rec[f"{impl}_ms"] = round(total / 1e3, 3)
            for impl in impls[2:]:  # the int4 GEMVs' 32 layers alone (no LM head)
                rec[f"{impl}_layers_ms"] = round(LAYERS * sum(t[s][impl] for s in layer) / 1e3, 3)
            rec["speedup"] = round(rec["bf16_ms"] / rec["served_ms"], 3)
            for c in args.gemv:  # each half2 GEMV against the float32 one, int4 layers only
                if c != "float32" and "gemv_float32_layers_ms" in rec:
                    ratio = rec["gemv_float32_layers_ms"] / rec[f"gemv_{c}_layers_ms"]
                    rec[f"{c}_speedup"] = round(ratio, 3)
            emit(rec)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
