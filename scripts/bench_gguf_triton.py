"""The GGUF Triton kernels (kernels/gguf_triton.py) against the bf16 skinny GEMM on the Llama-3-8B decode
GEMMs, for each GGUF type, at M = 1 and 16 rows by default.

  python scripts/bench_gguf_triton.py --out gguf.jsonl                   # every type, M = 1 and 16
  python scripts/bench_gguf_triton.py --types Q4_K Q6_K --m 1 4 16 64    # M > 16: dequantize + cuBLAS

First, per (type, shape), a correctness check against gguf.quants.dequantize (numpy) on the first
CHECK_ROWS rows: gguf_dequantize to float32 within 2^-22 of max|w| (FMA vs numpy's multiply and add),
gguf_linear within 2e-2 of max|ref| (bf16 output);
a failure stops the run. Weights are random bytes with finite scales (random_qweight).

Timing as in bench_skinny_gemm.py (its graph_time_us): each implementation's calls captured in one CUDA
graph cycling over enough weight copies to exceed L2, median replay. TB/s counts the bytes each one reads
from its weight: the quantized blocks for gguf (N * K / QK * BB), N * K * 2 for bf16. The baseline is
kernels/skinny_gemm.py at M <= 16 and cuBLAS (F.linear) above.

One JSON line per (type, shape, M): us, weight bytes, TB/s, speedup (bf16_us / gguf_us), the first call's
seconds (compile + autotune) and the tuned config; one line per (type, shape) with gguf_dequantize's time
to bf16 (the prefill path); then per (type, M) the 32 layers' GEMMs of a decode step (no LM head).
Needs the repo on the path (PYTHONPATH=. or pip install -e .).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from bench_skinny_gemm import L2_FLUSH_BYTES, LAYERS, copy_bandwidth_gbps, graph_time_us
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from radixserve.kernels import gguf_triton as gt
from radixserve.kernels import skinny_gemm as sg

SHAPES = {  # Llama-3-8B, tp=1: name -> (N, K); the LM head is usually kept at Q6_K / Q8_0 and is left out
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
CHECK_ROWS = 256


def config_str(c) -> str:
    if c is None:
        return "?"
    return f"BN{c.kwargs['BLOCK_N']}_PC{c.kwargs['PLANE_COLS']}_w{c.num_warps}_s{c.num_stages}"


def check(q: torch.Tensor, qtype: GGMLQuantizationType, K: int) -> float:
    """Max error of gguf_linear vs the numpy-based reference on the first rows, relative to max|ref|."""
    rows = slice(0, CHECK_ROWS)
    w = gt.gguf_dequantize(q, qtype, torch.float32)[rows]
    ref = gt.gguf_dequantize_ref(q[rows], qtype)
    tol = 2**-22 * ref.abs().max().item()  # one FMA (GPU) vs a multiply and an add (numpy)
    assert (w - ref).abs().max().item() <= tol, f"{qtype.name}: dequantize differs"
    worst = 0.0
    for m in (1, 16, 40):
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        got = gt.gguf_linear(x, q, qtype)[:, rows].float()
        ref = gt.gguf_linear_ref(x, q[rows], qtype).float()
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel < 2e-2, f"{qtype.name} M={m}: gguf_linear off by {rel:.3g} of max|ref|"
        worst = max(worst, rel)
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", nargs="+", default=[t.name for t in gt.SUPPORTED])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
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
    emit(
        {
            "device": props.name,
            "sms": props.multi_processor_count,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "copy_gbps": round(copy_bandwidth_gbps(), 1),
        }
    )
    qtypes = [GGMLQuantizationType[name] for name in args.types]
    bf16_us: dict[
        tuple[str, int], float
    ] = {}  # the baseline does not depend on the type: timed once
    steps: dict[tuple[str, int], list[float]] = {}
    for name in args.shapes:
        N, K = SHAPES[name]
        dense_bytes = N * K * 2
        dense = [
            torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
            for _ in range(max(1, math.ceil(L2_FLUSH_BYTES / dense_bytes)))
        ]
        dense_calls = len(dense) * max(1, math.ceil(max(20, 2e9 / dense_bytes) / len(dense)))
        for m in args.m:
            x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
            base = sg.skinny_gemm if m <= sg.M_MAX else F.linear
            bf16_us[name, m] = graph_time_us(lambda w: base(x, w), dense, dense_calls)
        del dense
        torch.cuda.empty_cache()
        for qtype in qtypes:
            qk, bb = GGML_QUANT_SIZES[qtype]
            qbytes = N * K // qk * bb
            gen = torch.Generator().manual_seed(0)
            q0 = gt.random_qweight(N, K, qtype, generator=gen, device="cuda")
            err = check(q0, qtype, K)
            copies = [q0] + [q0.clone() for _ in range(math.ceil(L2_FLUSH_BYTES / qbytes) - 1)]
            calls = len(copies) * max(1, math.ceil(max(20, 2e9 / qbytes) / len(copies)))
            deq_us = graph_time_us(
                lambda q: gt.gguf_dequantize(q, qtype, torch.bfloat16), copies, calls=len(copies)
            )
            emit(
                {
                    "type": qtype.name,
                    "shape": name,
                    "N": N,
                    "K": K,
                    "dequantize_us": round(deq_us, 2),
                    "dequantize_read_write_tbps": round((qbytes + dense_bytes) / deq_us / 1e6, 3),
                    "max_rel_err": err,
                }
            )
            for m in args.m:
                x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
                t0 = time.perf_counter()
                gt.gguf_linear(x, q0, qtype)  # compiles and autotunes this (M bucket, N, K, type)
                torch.cuda.synchronize()
                first_call_s = time.perf_counter() - t0
                chosen = (
                    config_str(gt.tuned_config(m, qtype)) if m <= sg.M_MAX else "dequantize+cublas"
                )
                us = graph_time_us(lambda q: gt.gguf_linear(x, q, qtype), copies, calls)
                base = bf16_us[name, m]
                steps.setdefault((qtype.name, m), [0.0, 0.0])
                steps[qtype.name, m][0] += LAYERS * us
                steps[qtype.name, m][1] += LAYERS * base
                emit(
                    {
                        "type": qtype.name,
                        "shape": name,
                        "M": m,
                        "gguf_us": round(us, 2),
                        "bf16_us": round(base, 2),
                        "gguf_bytes": qbytes,
                        "gguf_tbps": round(qbytes / us / 1e6, 3),
                        "bf16_tbps": round(dense_bytes / base / 1e6, 3),
                        "speedup": round(base / us, 3),
                        "config": chosen,
                        "first_call_s": round(first_call_s, 2),
                    }
                )
            del copies, q0
            torch.cuda.empty_cache()
    if set(args.shapes) == set(SHAPES):
        for (tname, m), (g_us, b_us) in steps.items():
            emit(
                {
                    "summary": "decode_step_gemms_no_lm_head",
                    "type": tname,
                    "M": m,
                    "layers": LAYERS,
                    "gguf_ms": round(g_us / 1e3, 3),
                    "bf16_ms": round(b_us / 1e3, 3),
                    "speedup": round(b_us / g_us, 3),
                }
            )
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
