"""bs1 decode of the embedded SmolLM2-135M-Instruct Q4_1 GGUF on the CPU: the forward per token with
the file's blocks served natively vs dequantized (--quantization unquant), through ModelRunner (no
services), and llama.cpp on the same file when llama-cpp-python is importable (optional, not in CI).

Prints one JSON line per variant: median wall ms per decode step over --repeats runs of --tokens steps,
and CPU ms per step (process CPU time: less disturbed by other jobs on a shared machine).
Usage: python scripts/bench_gguf_cpu.py [--tokens 64] [--repeats 3] [--dtypes bfloat16 float32]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from radixserve.common.config import RunnerConfig  # noqa: E402
from radixserve.common.model_files import embedded_gguf, resolve_model_path  # noqa: E402
from radixserve.common.sampling import SamplingParams  # noqa: E402
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402

PROMPT_IDS = [1, 9690, 198, 2683, 253, 1789, 4116, 563, 260, 2090, 282, 260, 7220, 6789, 30]


def decode_run(runner: ModelRunner, tokens: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per decode step of one greedy sequence after its prefill."""
    runner.reset()
    n = len(PROMPT_IDS)
    greedy = SamplingParams(temperature=0.0)
    runner.step(
        StepInput(
            1, new_requests=[NewRequest("r", PROMPT_IDS, list(range(1, n + 1)), sampling=greedy)]
        )
    )
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(tokens):
        runner.step(StepInput(i + 2, continuing_requests=[ContinuingRequest("r", [n + 1 + i])]))
    steps = tokens
    return (
        (time.perf_counter() - wall0) * 1e3 / steps,
        (time.process_time() - cpu0) * 1e3 / steps,
    )


def bench_runner(folder, dtype: str, quantization: str | None, tokens: int, repeats: int) -> dict:
    runner = ModelRunner(
        folder,
        RunnerConfig(dtype=dtype, device="cpu", quantization=quantization, max_total_tokens=4096),
        keep_logits=False,
    )
    decode_run(runner, 8)  # warm-up (builds the kernels, first allocations)
    runs = [decode_run(runner, tokens) for _ in range(repeats)]
    return {
        "variant": "native gguf" if quantization == "gguf" else "dequantized",
        "dtype": dtype,
        "ms_per_token": round(statistics.median(r[0] for r in runs), 3),
        "cpu_ms_per_token": round(statistics.median(r[1] for r in runs), 3),
        "tokens": tokens,
        "repeats": repeats,
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    args = parser.parse_args()
    folder = resolve_model_path(None)
    for dtype in args.dtypes:
        for quantization in ("gguf", "unquant"):
            print(json.dumps(bench_runner(folder, dtype, quantization, args.tokens, args.repeats)))
    reference = bench_llama_cpp(args.tokens, args.repeats)
    if reference is not None:
        print(json.dumps(reference))


if __name__ == "__main__":
    main()
