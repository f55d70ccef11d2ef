"""Greedy tokens of one model served at --tp 1 and at --tp N (dummy weights are the same at every TP
size), through the whole stack: prints one JSON line with both token lists and where they first differ.

bf16 all-reduces sum in a different order than one GPU's GEMM, so random-weight logits with near
ties can fork; the report gives the first difference rather than a bare pass/fail.
Usage: python scripts/check_tp_parity.py --model-path M --tp 2 [--extra "--ep 2"] [--max-new-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import tempfile

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests.stack import start_stack, stop_stack  # noqa: E402

PROMPTS = [[128000, 791, 6864, 315, 9822, 374], list(range(1000, 1100)), [128000] + list(range(5000, 5300, 7))]


def greedy_tokens(flags: list[str], max_new_tokens: int) -> list[list[int]]:
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(*flags, log_path=f"{tmp}/serve.log")
        try:
            out = []
            for ids in PROMPTS:
                r = httpx.post(stack.base_url + "/generate", timeout=300, json={
                    "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                                          "ignore_eos": True}})
                r.raise_for_status()
                out.append(r.json()["output_ids"])
            return out
        finally:
            stop_stack(stack)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--extra", default="", help="more flags for the --tp N run, e.g. '--ep 2'")
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args()
    base = ["--model-path", a.model_path, "--load-format", "dummy", "--dtype", "bfloat16", "--skip-tokenizer-init",
            "--max-total-tokens", "32768"]
    one = greedy_tokens(base, a.max_new_tokens)
    many = greedy_tokens([*base, "--tp", str(a.tp), *shlex.split(a.extra)], a.max_new_tokens)
    first_diff = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), None) for s, t in zip(one, many)]
    print(json.dumps({"model": a.model_path, "tp": a.tp, "extra": a.extra, "identical": one == many,
                      "first_difference": first_diff, "tp1": one, f"tp{a.tp}": many}))


if __name__ == "__main__":
    main()
