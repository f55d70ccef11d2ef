"""Greedy tokens of one model served at --tp 1 and at --tp N (dummy weights are the same at every TP
size), through the whole stack and its gRPC API: prints one JSON line with both token lists.

bf16 all-reduces sum in a different order than one GPU's GEMM, so random-weight logits with near
ties can fork. As vLLM's check_logprobs_close does, a prompt passes when the tokens are identical or
when, at the first difference, each side's token is in the other side's top-5; the comparison stops there.
Usage: python scripts/check_tp_parity.py --model-path M --tp 2 [--extra "--ep 2"] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import tempfile

import grpc

from radixserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests.stack import start_stack, stop_stack  # noqa: E402

PROMPTS = [
    [1, 791, 6864, 315, 9822, 374],
    list(range(1000, 1100)),
    [1] + list(range(5000, 9000, 13)),
]


TOP = 5


def greedy_runs(flags: list[str], max_new_tokens: int) -> list[list[tuple[int, set[int]]]]:
    """Per prompt: (token, its position's top-5 ids) for each generated token."""
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(*flags, log_path=f"{tmp}/serve.log")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                return [_generate(stub, ids, max_new_tokens) for ids in PROMPTS]
        finally:
            stop_stack(stack)


def _generate(stub, ids: list[int], max_new_tokens: int) -> list[tuple[int, set[int]]]:
    sampling = common_pb2.SamplingParams(temperature=0, return_logprob=True, top_logprobs_num=TOP)
    stopping = common_pb2.StoppingCriteria(max_new_tokens=max_new_tokens, ignore_eos=True)
    out = []
    for msg in stub.Generate(
        gateway_pb2.GatewayGenerateRequest(
            input_ids=common_pb2.TokenIds(ids=ids), sampling=sampling, stopping=stopping
        ),
        timeout=300,
    ):
        out += [(lp.token_id, {t.token_id for t in lp.top}) for lp in msg.logprobs]
    return out


def compare(one: list[tuple[int, set[int]]], many: list[tuple[int, set[int]]]) -> dict:
    for i, ((a, top_a), (b, top_b)) in enumerate(zip(one, many)):
        if a != b:
            return {"identical_tokens": i, "passed": a in top_b and b in top_a}
    return {"identical_tokens": min(len(one), len(many)), "passed": len(one) == len(many)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--extra", default="", help="more flags for the --tp N run, e.g. '--ep 2'")
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args()
    base = [
        "--model-path",
        a.model_path,
        "--load-format",
        "dummy",
        "--dtype",
        "bfloat16",
        "--skip-tokenizer-init",
        "--max-total-tokens",
        "32768",
    ]
    one = greedy_runs(base, a.max_new_tokens)
    many = greedy_runs([*base, "--tp", str(a.tp), *shlex.split(a.extra)], a.max_new_tokens)
    prompts = [compare(x, y) for x, y in zip(one, many)]
    print(
        json.dumps(
            {
                "model": a.model_path,
                "tp": a.tp,
                "extra": a.extra,
                "passed": all(p["passed"] for p in prompts),
                "prompts": prompts,
                "tp1": [[t for t, _ in r] for r in one],
                f"tp{a.tp}": [[t for t, _ in r] for r in many],
            }
        )
    )


if __name__ == "__main__":
    main()
