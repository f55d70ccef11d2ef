"""bs1 decode of the embedded SmolLM2-135M-Instruct Q4_1 GGUF on the CPU: the forward per token with
the file's blocks served natively vs dequantized (--quantization unquant), each through the fused CPU
decode step (kernels/cpu_decode.cpp, where the CPU has AVX512-BF16 and the dtype is bfloat16) and
through the torch path (RADIXSERVE_CPU_DECODE_KERNELS=0), through ModelRunner (no services), the
variants' runs alternating so that load from other jobs falls on all; and llama.cpp on the same file
when llama-cpp-python is importable (optional, not in CI).

Prints one JSON line per variant: median wall ms per decode step over --repeats runs of --tokens steps,
and CPU ms per step (process CPU time: less disturbed by other jobs on a shared machine).
Usage: python scripts/bench_gguf_cpu.py [--tokens 64] [--repeats 3] [--dtypes bfloat16 float32]

With --kernel-rows M [M ...] it times the linear kernels alone instead (gguf_cpu.gguf_matmul on the
model's shapes: q|k|v, o, gate|up, down as Q4_1, the Q8_0 LM head; M activation rows: 1 is a decode
step, K + 1 a verify step with K drafts), and with --baseline-source another gguf_cpu.cpp built beside
it (e.g. `git show main:kernels/gguf_cpu.cpp > /tmp/base.cpp`), the two alternating; one JSON line per
(shape, M) with each kernel's best ms of --repeats, and the model's total (30 layers + the head):
  python scripts/bench_gguf_cpu.py --kernel-rows 1 5 9 --baseline-source /tmp/base.cpp
(a gguf_cpu_kernels.h beside the baseline source is the one it builds with.)

With --kquant-rows M [M ...] it times the K-quant kernels (Q4_K, Q5_K, Q6_K) at SmolLM2-135M's shapes
(the hidden-side K of 576 taken as 768: K-quants need multiples of 256) on the file's rows and on the
packed rows a model loads (gguf_cpu.pack_rows), against dequantizing per call and against bf16 F.linear
on the dequantized weight, side by side, one JSON line per (type, shape, M):
  python scripts/bench_gguf_cpu.py --kquant-rows 1 4 16 --repeats 5

With --profile it breaks a bs1 decode step (--batch N: a step of N sequences) of the native model
through the fused path down instead:
per stage of the C++ forward (DecodeModel.profile: each thread's work and each stage's wall time, barrier
included), the LM head, the embedding and the rest of runner.step, in ms per step; then the GGUF's bytes
by role and type, the memory read rate (a float32 sum over 512 MiB) and the floor they set:
  OMP_WAIT_POLICY=PASSIVE python scripts/bench_gguf_cpu.py --profile --tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from radixserve.common.config import RunnerConfig  # noqa: E402
from radixserve.common.model_files import embedded_gguf, resolve_model_path  # noqa: E402
from radixserve.common.sampling import SamplingParams  # noqa: E402
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402

PROMPT_IDS = [1, 9690, 198, 2683, 253, 1789, 4116, 563, 260, 2090, 282, 260, 7220, 6789, 30]


def decode_run(runner: ModelRunner, tokens: int, batch: int = 1) -> tuple[float, float]:
    """(wall ms, CPU ms) per decode step of `batch` greedy sequences after their prefill (one step)."""
    runner.reset()
    n = len(PROMPT_IDS)
    stride = n + tokens + 1  # KV slots per sequence
    greedy = SamplingParams(temperature=0.0)
    runner.step(
        StepInput(
            1,
            new_requests=[
                NewRequest(
                    f"r{b}",
                    PROMPT_IDS,
                    list(range(b * stride + 1, b * stride + n + 1)),
                    sampling=greedy,
                )
                for b in range(batch)
            ],
        )
    )
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(tokens):
        runner.step(
            StepInput(
                i + 2,
                continuing_requests=[
                    ContinuingRequest(f"r{b}", [b * stride + n + 1 + i]) for b in range(batch)
                ],
            )
        )
    steps = tokens
    return (
        (time.perf_counter() - wall0) * 1e3 / steps,
        (time.process_time() - cpu0) * 1e3 / steps,
    )


def make_runner(folder, dtype: str, quantization: str, fused: bool) -> ModelRunner:
    from radixserve.kernels import cpu_decode

    os.environ["RADIXSERVE_CPU_DECODE_KERNELS"] = "1" if fused else "0"
    cpu_decode.reset_for_tests()  # read the switch again
    try:
        return ModelRunner(
            folder,
            RunnerConfig(
                dtype=dtype, device="cpu", quantization=quantization, max_total_tokens=4096
            ),
            keep_logits=False,
        )
    finally:
        cpu_decode.reset_for_tests()


def bench_runners(folder, dtype: str, tokens: int, repeats: int, threads: int | None) -> list[dict]:
    """Every variant of this dtype (fused variants only where the fused path runs), runs alternating."""
    runners = {}
    for quantization in ("gguf", "unquant"):
        for fused in (True, False):
            runner = make_runner(folder, dtype, quantization, fused)
            if fused and runner.fast_decode is None:
                continue
            name = "native gguf" if quantization == "gguf" else "dequantized"
            runners[name + (", fused decode" if fused else ", torch path")] = runner
    if threads:
        torch.set_num_threads(threads)  # after ModelRunner, which sets the CPU's count
    for runner in runners.values():
        decode_run(runner, 8)  # warm-up (builds the kernels, first allocations)
    runs = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            runs[name].append(decode_run(runner, tokens))
    return [
        {
            "variant": name,
            "dtype": dtype,
            "ms_per_token": round(statistics.median(r[0] for r in runs[name]), 3),
            "cpu_ms_per_token": round(statistics.median(r[1] for r in runs[name]), 3),
            "tokens": tokens,
            "repeats": repeats,
        }
        for name in runners
    ]


def bench_llama_cpp(tokens: int, repeats: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(embedded_gguf()), n_ctx=512, verbose=False)
    runs = []
    for _ in range(repeats):
        llm.reset()
        llm.eval(PROMPT_IDS)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(tokens):
            llm.eval([llm.sample(temp=0.0)])
        runs.append(
            (
                (time.perf_counter() - wall0) * 1e3 / tokens,
                (time.process_time() - cpu0) * 1e3 / tokens,
            )
        )
    return {
        "variant": "llama.cpp",
        "ms_per_token": round(statistics.median(r[0] for r in runs), 3),
        "cpu_ms_per_token": round(statistics.median(r[1] for r in runs), 3),
        "tokens": tokens,
        "repeats": repeats,
    }


def read_bandwidth(mb: int = 512, repeats: int = 7) -> dict:
    """GB/s of a float32 sum over `mb` MiB (well past the L3): the memory read rate a decode step's weight
    reads are bounded by, at 1 and at the runner's thread count."""
    x = torch.ones(mb << 18, dtype=torch.float32)
    threads, out = torch.get_num_threads(), {}
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                x.sum()
                best = min(best, time.perf_counter() - t0)
            out[f"read_gb_s_{t}_threads"] = round(x.numel() * 4 / best / 1e9, 1)
    finally:
        torch.set_num_threads(threads)
    return out


def weight_bytes() -> dict:
    """Bytes of the GGUF file's tensors a decode step reads, by role and block type."""
    import gguf

    reader = gguf.GGUFReader(str(embedded_gguf()))
    out: dict[str, int] = {}
    for t in reader.tensors:
        role = "layers" if t.name.startswith("blk.") else t.name.split(".")[0]
        key = f"{role} {t.tensor_type.name}"
        out[key] = out.get(key, 0) + int(t.n_bytes)
    return out


class _Timed:
    """Calls of `fn` with their wall time added to totals[name]."""

    def __init__(self, fn, totals: dict, name: str):
        self.fn, self.totals, self.name = fn, totals, name

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.totals[self.name] = self.totals.get(self.name, 0.0) + time.perf_counter() - t0


class _ProfiledKernelModel:
    """Stands in for FastDecode's DecodeModel: runs its timed forward (DecodeModel.profile) and sums the
    per-stage times."""

    def __init__(self, model, stages: list[str], totals: dict):
        self.model, self.stages, self.totals = model, stages, totals

    def forward(self, *args):
        hidden, times = self.model.profile(*args)
        for i, stage in enumerate(self.stages):
            for row in range(times.shape[0]):
                who = "wall" if row == times.shape[0] - 1 else f"thread{row}"
                key = f"{who} {stage}"
                self.totals[key] = self.totals.get(key, 0.0) + float(times[row, i])
        return hidden


def profile_decode(tokens: int, repeats: int, threads: int | None, batch: int = 1) -> None:
    """Where a decode step of `batch` sequences (1: bs1) of the native Q4_1 model through the fused path
    goes: one JSON line per part, ms per step (median over repeats), and the floor its weight reads set."""
    from radixserve.kernels import cpu_decode

    runner = make_runner(resolve_model_path(None), "bfloat16", "gguf", True)
    if runner.fast_decode is None:
        raise SystemExit("the fused CPU decode path does not run on this machine")
    if threads:
        torch.set_num_threads(threads)
    fast = runner.fast_decode
    stages = list(cpu_decode.load().STAGES)
    decode_run(runner, 8, batch)  # warm-up
    runs = []
    for _ in range(repeats):
        totals: dict[str, float] = {}
        kernel_model, embed = fast._kernel_model, fast._embed
        fast._kernel_model = _ProfiledKernelModel(kernel_model, stages, totals)
        fast._embed = _Timed(embed, totals, "embedding")
        fast.forward = _Timed(fast.forward, totals, "fused forward (embedding + C++ call)")
        # The fused steps' LM head (FastDecode.compute_logits: gguf_logits, else model.compute_logits).
        fast.compute_logits = _Timed(fast.compute_logits, totals, "lm head (compute_logits)")
        try:
            wall, cpu = decode_run(runner, tokens, batch)
        finally:  # the instances' own attributes go; their class's methods show again
            fast._kernel_model, fast._embed = kernel_model, embed
            del fast.forward, fast.compute_logits
        totals = {k: v * 1e3 / tokens for k, v in totals.items()}
        totals["step (runner.step)"] = wall
        totals["step cpu"] = cpu
        runs.append(totals)
    parts = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    wall_stages = sum(v for k, v in parts.items() if k.startswith("wall "))
    parts["C++ forward, all stages"] = round(wall_stages, 3)
    parts["rest of the step (sampling, runner Python)"] = round(
        parts["step (runner.step)"]
        - parts["fused forward (embedding + C++ call)"]
        - parts["lm head (compute_logits)"],
        3,
    )
    for k, v in parts.items():
        print(json.dumps({"part": k, "ms_per_step": v}))
    sizes = weight_bytes()
    bw = read_bandwidth()
    print(json.dumps({"weight_bytes": sizes, **bw, "threads": torch.get_num_threads()}))
    total = sum(sizes.values())
    for key, rate in bw.items():
        print(json.dumps({"floor_ms": round(total / rate / 1e6, 2), "at": key}))


# SmolLM2-135M's linear layers: (name, out features, in features, block type, per model).
SHAPES = [
    ("qkv", 960, 576, 3, 30),
    ("o", 576, 576, 3, 30),
    ("gate_up", 3072, 576, 3, 30),
    ("down", 576, 1536, 3, 30),
    ("lm_head", 49152, 576, 8, 1),
]


def random_blocks(n: int, k: int, qtype: int, g: torch.Generator) -> torch.Tensor:
    """uint8 [n, row bytes] of random nibbles / int8 values with small f16 scales (and Q4_1 mins)."""
    from radixserve.kernels import gguf_cpu

    values, bb = gguf_cpu.block_shape(qtype)
    nb = k // values
    w = torch.randint(0, 256, (n, nb, bb), dtype=torch.uint8, generator=g)
    w[..., 0:2] = (torch.rand(n, nb, generator=g) * 0.02).half().view(torch.uint8).view(n, nb, 2)
    if qtype == gguf_cpu.Q4_1:
        m = -torch.rand(n, nb, generator=g) * 0.05
        w[..., 2:4] = m.half().view(torch.uint8).view(n, nb, 2)
    return w.reshape(n, nb * bb)


def bench_kernels(rows: list[int], repeats: int, baseline: str | None) -> None:
    from torch.utils import cpp_extension

    from radixserve.kernels import gguf_cpu

    kernels = {"current": gguf_cpu.load()}
    if kernels["current"] is None:
        raise SystemExit("the GGUF CPU extension is unavailable on this machine")
    if baseline:
        # Its gguf_cpu_kernels.h: the one beside it if there is one (the compiler looks there first),
        # else this tree's; the name covers the header's text too.
        header = pathlib.Path(baseline).with_name(gguf_cpu.KERNELS_HEADER.name)
        if not header.exists():
            header = gguf_cpu.KERNELS_HEADER
        key = hashlib.sha256(pathlib.Path(baseline).read_bytes() + header.read_bytes())
        kernels["baseline"] = cpp_extension.load(
            name="radixserve_gguf_cpu_baseline_" + key.hexdigest()[:10],
            sources=[baseline],
            extra_cflags=gguf_cpu._CFLAGS,
            extra_include_paths=[str(header.parent)],
        )
    g = torch.Generator().manual_seed(0)
    totals: dict[tuple[str, int], float] = {}
    for name, n, k, qtype, count in SHAPES:
        w = random_blocks(n, k, qtype, g)
        for m in rows:
            x = torch.randn(m, k, generator=g)
            calls = max(3, int(2e8 / (n * k * m)))
            best = {key: float("inf") for key in kernels}
            for _ in range(repeats):
                for key, module in kernels.items():  # alternating: load falls on both
                    module.gguf_matmul(x, w, qtype)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        module.gguf_matmul(x, w, qtype)
                    best[key] = min(best[key], (time.perf_counter() - t0) * 1e3 / calls)
            for key, ms in best.items():
                totals[key, m] = totals.get((key, m), 0.0) + ms * count
            line = {"shape": f"{name} {n}x{k}", "rows": m}
            line.update({f"{key}_ms": round(ms, 4) for key, ms in best.items()})
            if baseline:
                line["speedup"] = round(best["baseline"] / best["current"], 2)
            print(json.dumps(line), flush=True)
    for m in rows:
        line = {"shape": "model (30 layers + head)", "rows": m}
        line.update({f"{key}_ms": round(totals[key, m], 2) for key in kernels})
        line["current_over_1_row"] = round(totals["current", m] / totals["current", rows[0]], 2)
        if baseline:
            line["speedup"] = round(totals["baseline", m] / totals["current", m], 2)
        print(json.dumps(line))


# SmolLM2-135M's shapes for the K-quants (hidden 576, intermediate 1536, vocab 49152): K must be a whole
# number of 256-value super-blocks, so the hidden-side inputs (576) are timed at 768 (the next multiple;
# llama.cpp's Q4_K_M gives such tensors other types), down (K = 1536) at its own shape.
KQUANT_SHAPES = [
    ("qkv", 960, 768),
    ("gate_up", 3072, 768),
    ("down", 576, 1536),
    ("lm_head", 49152, 768),
]
# (offset, scale) of each f16 scale in a K-quant block: d (and dmin) small, as a model's weights.
_K_SCALE_OFFSETS = {12: ((0, 2e-3), (2, 1e-3)), 13: ((0, 1e-3), (2, 5e-4)), 14: ((208, 3e-5),)}


def random_k_blocks(n: int, k: int, qtype: int, g: torch.Generator) -> torch.Tensor:
    """uint8 [n, row bytes] of random K-quant blocks with small finite f16 scales."""
    from radixserve.kernels import gguf_cpu

    values, bb = gguf_cpu.block_shape(qtype)
    nb = k // values
    w = torch.randint(0, 256, (n, nb, bb), dtype=torch.uint8, generator=g)
    for off, scale in _K_SCALE_OFFSETS[qtype]:
        h = (torch.rand(n, nb, generator=g) * scale + scale / 2).half()
        w[..., off : off + 2] = h.view(torch.uint8).view(n, nb, 2)
    return w.reshape(n, nb * bb)


def _best_ms(fn, repeats: int, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) * 1e3 / calls)
    return best


def bench_kquants(rows: list[int], repeats: int) -> None:
    """Q4_K / Q6_K at SmolLM2-135M's shapes: the native kernel (gguf_cpu.gguf_linear on float32 rows)
    against (a) dequantizing per call, as gguf_linear did for the K-quants before (gguf.quants, then a
    float32 F.linear), also with the C++ dequantize (dequantize-per-call at its best), and (b) bf16
    F.linear on the weight dequantized once (what a K-quant file got by default: bf16 weights at load)."""
    import numpy as np
    import torch.nn.functional as F

    from radixserve.kernels import gguf_cpu

    module = gguf_cpu.load()
    if module is None:
        raise SystemExit("the GGUF CPU extension is unavailable on this machine")
    g = torch.Generator().manual_seed(0)
    for qtype in gguf_cpu.K_QUANT_TYPES:
        import gguf

        name = gguf.GGMLQuantizationType(qtype).name
        for shape, n, k in KQUANT_SHAPES:
            w = random_k_blocks(n, k, qtype, g)
            w_bf16 = module.gguf_dequantize(w, qtype, k).bfloat16()
            packed, ptype = gguf_cpu.pack_rows(w, qtype), gguf_cpu.PACKED + qtype

            def per_call_gguf(x, w=w, k=k):
                values = gguf.quants.dequantize(w.numpy(), gguf.GGMLQuantizationType(qtype))
                return F.linear(x, torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))

            for m in rows:
                x = torch.randn(m, k, generator=g)
                xb = x.bfloat16()
                calls = max(3, int(1e8 / (n * k)))
                line = {"type": name, "shape": f"{shape} {n}x{k}", "rows": m}
                times = {
                    "native_ms": _best_ms(
                        lambda: gguf_cpu.gguf_linear(x, w, qtype), repeats, calls
                    ),
                    "packed_ms": _best_ms(
                        lambda: gguf_cpu.gguf_linear(x, packed, ptype), repeats, calls
                    ),
                    "dequant_per_call_gguf_ms": _best_ms(lambda: per_call_gguf(x), repeats, 1),
                    "dequant_per_call_cpp_ms": _best_ms(
                        lambda: F.linear(x, module.gguf_dequantize(w, qtype, k)), repeats, 3
                    ),
                    "bf16_linear_ms": _best_ms(lambda: F.linear(xb, w_bf16), repeats, calls),
                }
                line.update({key: round(ms, 4) for key, ms in times.items()})
                line["native_vs_bf16"] = round(times["bf16_linear_ms"] / times["native_ms"], 2)
                line["packed_vs_native"] = round(times["native_ms"] / times["packed_ms"], 2)
                line["packed_vs_bf16"] = round(times["bf16_linear_ms"] / times["packed_ms"], 2)
                line["native_vs_per_call_gguf"] = round(
                    times["dequant_per_call_gguf_ms"] / times["native_ms"], 1
                )
                print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument(
        "--kernel-rows",
        nargs="+",
        type=int,
        help="time the linear kernels alone at these row counts",
    )
    parser.add_argument("--baseline-source", help="with --kernel-rows: a gguf_cpu.cpp to compare")
    parser.add_argument(
        "--kquant-rows",
        nargs="+",
        type=int,
        help="time native Q4_K / Q6_K against dequantize-per-call and bf16 F.linear at these row counts",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (the fused kernels' too); 1 on a loaded shared machine, where a "
        "parallel region waits for descheduled workers",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="break a fused bs1 decode step of the native model down by part (C++ stages, LM head, "
        "Python) and print the weight-read floor",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="with --profile: sequences decoding together (16: a 16-token step; at most "
        "FastDecode.MAX_TOKENS run fused)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the kernel timings; bench_runners sets it again
    if args.profile:
        profile_decode(args.tokens, args.repeats, args.threads, args.batch)
        return
    if args.kernel_rows:
        bench_kernels(args.kernel_rows, args.repeats, args.baseline_source)
        return
    if args.kquant_rows:
        bench_kquants(args.kquant_rows, args.repeats)
        return
    folder = resolve_model_path(None)
    for dtype in args.dtypes:
        for line in bench_runners(folder, dtype, args.tokens, args.repeats, args.threads):
            print(json.dumps(line))
    reference = bench_llama_cpp(args.tokens, args.repeats)
    if reference is not None:
        print(json.dumps(reference))


if __name__ == "__main__":
    main()
