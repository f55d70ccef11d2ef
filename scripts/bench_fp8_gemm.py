"""fp8 weight GEMMs (kernels/fp8_gemm.py) against bf16 on the Llama-3-8B linears, checked and timed.

  PYTHONPATH=. python scripts/bench_fp8_gemm.py --out fp8.jsonl        # a few minutes on an H100
  PYTHONPATH=. python scripts/bench_fp8_gemm.py --m 1 --sweep          # every skinny config too

For each M (rows: 1, 8, 16 decode; 256, 8192 prefill) and shape: bf16 (cuBLAS F.linear, and the bf16 skinny
GEMM for M <= 16), fp8 rowwise (per-channel weight scales: the online `--quantization fp8` scheme; M <= 16
the fp8 skinny kernel, else per-token activation quantization + torch._scaled_mm on Hopper), fp8 block
(128x128 weight scales: the skinny kernel, else per-token-group quantization + the Triton block GEMM), and
for M > 16 the Triton rowwise GEMM that non-Hopper GPUs use. Timing as scripts/bench_skinny_gemm.py
(CUDA-graph replays cycling over weight copies larger than L2). Per line: us, weight TB/s (weight bytes /
time), TFLOPS (2 M N K / time), the max error against the dequantize-then-matmul reference relative to
its largest value. Then per M a 32-layer step's GEMMs (lm_head in bf16 in every column); the bs1 fp8
target: <= 3.0 ms (8 GB of fp8 weights at ~3 TB/s is ~2.7 ms; bf16 ~5.6 ms).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_skinny_gemm import (  # noqa: E402
    L2_FLUSH_BYTES,
    LAYERS,
    SHAPES,
    config_str,
    copy_bandwidth_gbps,
    graph_time_us,
)

from radixserve.kernels import fp8_gemm as fg  # noqa: E402
from radixserve.kernels import skinny_gemm as sg  # noqa: E402

BLOCK = (128, 128)
LINEARS = ("qkv", "o", "gate_up", "down")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return round(((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item(), 5)


def bench_shape(name: str, ms: list[int], sweep: bool, emit) -> dict[int, dict[str, float]]:
    N, K = SHAPES[name]
    copies = max(1, math.ceil(L2_FLUSH_BYTES / (N * K)))
    bf16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5 for _ in range(copies)]
    rowwise = [fg.quantize_weight(w) for w in bf16]
    block = [fg.quantize_weight(w, BLOCK) for w in bf16]
    out: dict[int, dict[str, float]] = {}
    for m in ms:
        calls = copies * max(1, math.ceil(max(20, 2e9 / (N * K) / max(1, m / 64)) / copies))
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        impls = {
            "bf16_cublas": (lambda w: F.linear(x, w), bf16),
            "fp8_rowwise": (lambda w: fg.fp8_linear(x, w[0], w[1]), rowwise),
            "fp8_block": (lambda w: fg.fp8_linear(x, w[0], w[1], BLOCK), block),
        }
        if m <= sg.M_MAX:
            impls["bf16_skinny"] = (lambda w: sg.skinny_gemm(x, w), bf16)
        else:

            def triton_rowwise(w):
                xq, xs = fg.quantize_activations(x)
                return fg.scaled_gemm_fp8(xq, xs, w[0], w[1], None, None, torch.bfloat16)

            impls["fp8_rowwise_triton"] = (triton_rowwise, rowwise)
        rec = {"M": m, "shape": name, "N": N, "K": K}
        times = {}
        for impl, (fn, weights) in impls.items():
            got = fn(weights[0])  # compiles (and autotunes) this shape
            block_of = BLOCK if "block" in impl else None
            w0 = weights[0]
            ref = (
                F.linear(x.float(), w0.float())
                if impl.startswith("bf16")
                else fg.skinny_gemm_fp8_ref(x.float(), w0[0], w0[1], block_of)
            )
            us = graph_time_us(fn, weights, calls)
            times[impl] = us
            weight_bytes = N * K * (2 if impl.startswith("bf16") else 1)
            rec[impl] = {
                "us": round(us, 2),
                "weight_tbps": round(weight_bytes / us / 1e6, 3),
                "tflops": round(2 * m * N * K / us / 1e6, 1),
                "rel_err": rel_err(got, ref),
            }
        if m <= fg.M_MAX:
            rec["skinny_fp8_config"] = config_str(fg.tuned_config(m))
            rec["skinny_fp8_block_config"] = config_str(fg.tuned_config(m, block=True))
        if sweep and m <= fg.M_MAX:
            rec["sweep_us"] = {}
            for c in fg.GEMV_CONFIGS if m == 1 else fg.DOT_CONFIGS:
                cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
                try:
                    us = graph_time_us(
                        lambda w: fg.skinny_gemm_fp8(x, w[0], w[1], config=dict(cfg)),
                        rowwise,
                        calls,
                    )
                    rec["sweep_us"][config_str(cfg)] = round(us, 2)
                except Exception as e:  # noqa: BLE001 - out of resources etc.: report, go on
                    rec["sweep_us"][config_str(cfg)] = type(e).__name__
        emit(rec)
        out[m] = times
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 16, 256, 8192])
    p.add_argument("--shapes", nargs="+", default=[*LINEARS, "lm_head"], choices=list(SHAPES))
    p.add_argument("--sweep", action="store_true", help="time every skinny fp8 config (M <= 16)")
    p.add_argument("--out", help="also write the JSON lines to this file")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    lines = []

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        lines.append(line)

    props = torch.cuda.get_device_properties(0)
    emit({"device": props.name, "torch": torch.__version__, "copy_gbps": copy_bandwidth_gbps()})
    per_shape = {name: bench_shape(name, args.m, args.sweep, emit) for name in args.shapes}
    for m in args.m:
        if not all(s in per_shape for s in (*LINEARS, "lm_head")):
            break
        head = per_shape["lm_head"][m]
        head_us = min(head.get("bf16_skinny", math.inf), head["bf16_cublas"])
        summary = {"summary": "step_gemms_ms", "M": m, "layers": LAYERS}
        for impl in per_shape["qkv"][m]:
            layers_us = LAYERS * sum(per_shape[s][m][impl] for s in LINEARS)
            summary[impl] = round((layers_us + head_us) / 1e3, 3)
        emit(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
