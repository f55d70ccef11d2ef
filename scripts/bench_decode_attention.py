"""Decode attention's achieved memory bandwidth on the GPU, across launch configurations.

A decode batch as the rate-inf benchmark makes it (default: 256 sequences of 512-768 tokens, Llama-3-8B's
32 query / 8 kv heads of 128), its K/V spread over the pool either contiguously per sequence or shuffled
slot by slot. For each (BLOCK_N, num_warps, num_stages, num_splits) it prints the kernel time (CUDA
events, median of the repeats) and GB/s of K/V read, best first, and the ratio to the configuration the
backend uses today.

With --kv-dtype fp8_e5m2 | fp8_e4m3 the pool is fp8 (scales 0.5 / 2.0, as a served fp8 pool passes
them): the grid (each configuration with the block products in bf16 and in fp16, `fp16_math`) runs
on it, checked against the kernel over the same values in bf16, and "bf16_today"
times the bf16 pool at today's configuration side by side ("fp8_vs_bf16": its speed-up).

  python scripts/bench_decode_attention.py [--batch 256] [--min-len 512 --max-len 768] \
      [--kv-dtype fp8_e5m2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch

from radixserve.executor.kv_scales import FP8_KV_DTYPES
from radixserve.kernels.decode_attention import (
    FP16_MATH_DEFAULT,
    decode_attention,
    num_splits_for_batch,
)

KV_DTYPES = {"bf16": torch.bfloat16, **FP8_KV_DTYPES}  # --kv-dtype: as --kv-cache-dtype names them
K_SCALE, V_SCALE = 0.5, 2.0  # fp8 only


def make_batch(a, shuffled: bool):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(a.min_len, a.max_len + 1, (a.batch,), generator=g)
    total = int(lens.sum())
    slots = torch.randperm(total, generator=g) if shuffled else torch.arange(total)
    table = torch.zeros(a.batch, a.max_len, dtype=torch.int32)
    at = 0
    for b, n in enumerate(lens.tolist()):
        table[b, :n] = slots[at : at + n]
        at += n
    dev = "cuda"
    k = torch.randn(total, a.kv_heads, a.head_dim, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    q = torch.randn(a.batch, a.heads, a.head_dim, dtype=torch.bfloat16, device=dev)
    kv_dtype = KV_DTYPES[a.kv_dtype]
    if (
        kv_dtype != torch.bfloat16
    ):  # the pool holds x / scale; the bf16 copy holds what it reads back
        k, v = (k / K_SCALE).to(kv_dtype), (v / V_SCALE).to(kv_dtype)
    kv_bytes = 2 * total * a.kv_heads * a.head_dim * k.element_size()
    return q, k, v, table.to(dev), lens.to(dev), kv_bytes


def kernel(q, k, v, table, lens, cfg):
    """decode_attention on the pool (fp8: with its scales) at one launch configuration."""
    scales = {} if k.dtype == torch.bfloat16 else dict(k_scale=K_SCALE, v_scale=V_SCALE)
    return decode_attention(q, k, v, table, lens, 0.088, **cfg, **scales)


def time_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--min-len", type=int, default=512)
    p.add_argument("--max-len", type=int, default=768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="bf16")
    a = p.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fp8 = a.kv_dtype != "bf16"
    today = dict(
        block_n=128 if fp8 else 64,  # decode_attention's defaults for a head_dim of 128
        num_warps=4,
        num_stages=2,
        num_splits=num_splits_for_batch(a.batch, a.kv_heads, sms),
        fp16_math=FP16_MATH_DEFAULT and fp8,
    )
    grid = [
        dict(block_n=bn, num_warps=w, num_stages=s, num_splits=sp, fp16_math=f16)
        for bn, w, s, sp, f16 in itertools.product(
            (32, 64, 128), (4, 8), (2, 3, 4), (1, 2), (False, True) if fp8 else (False,)
        )
    ]
    for shuffled in (False, True):
        q, k, v, table, lens, kv_bytes = make_batch(a, shuffled)
        fp8 = k.dtype != torch.bfloat16
        # bf16 K/V holding exactly what an fp8 pool reads back (the reference and the side-by-side)
        k16 = (k.float() * K_SCALE).to(torch.bfloat16) if fp8 else k
        v16 = (v.float() * V_SCALE).to(torch.bfloat16) if fp8 else v
        plain = {**today, "block_n": 64, "fp16_math": False}  # the bf16 pool's configuration
        ref = decode_attention(q, k16, v16, table, lens, 0.088, **plain)
        rows = []
        for cfg in grid:
            try:
                out = kernel(q, k, v, table, lens, cfg)
                torch.cuda.synchronize()
                if not torch.allclose(out, ref, atol=2e-2, rtol=2e-2):
                    rows.append((cfg, None, "mismatch"))
                    continue
                ms = time_ms(lambda: kernel(q, k, v, table, lens, cfg), a.repeats)
                rows.append((cfg, ms, None))
            except Exception as e:  # a config the compiler rejects (shared memory) is skipped
                rows.append((cfg, None, f"{type(e).__name__}: {str(e)[:200]}"))
        ok = sorted((r for r in rows if r[1] is not None), key=lambda r: r[1])
        base = next((ms for cfg, ms, _ in ok if cfg == today), float("nan"))
        side = {}
        if fp8:
            bf16_ms = time_ms(lambda: kernel(q, k16, v16, table, lens, plain), a.repeats)
            side = {
                "bf16_today": {**plain, "ms": round(bf16_ms, 4)},
                "fp8_vs_bf16": round(bf16_ms / base, 3),
            }
        print(
            json.dumps(
                {
                    "layout": "shuffled slots" if shuffled else "contiguous slots",
                    "kv_dtype": a.kv_dtype,
                    **side,
                    "device": torch.cuda.get_device_name(0),
                    "kv_gb": round(kv_bytes / 1e9, 3),
                    "today": {
                        **today,
                        "ms": round(base, 4),
                        "tb_s": round(kv_bytes / base / 1e9, 3),
                    },
                    "best": [
                        {
                            **cfg,
                            "ms": round(ms, 4),
                            "tb_s": round(kv_bytes / ms / 1e9, 3),
                            "vs_today": round(base / ms, 3),
                        }
                        for cfg, ms, _ in ok[:12]
                    ],
                    "failed": [{**cfg, "why": why} for cfg, ms, why in rows if ms is None][:10],
                }
            )
        )


if __name__ == "__main__":
    main()
