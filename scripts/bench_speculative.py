"""Speculative decoding (NGRAM, or EAGLE / EAGLE3 with --speculative-draft-model-path) against plain
decoding at batch size 1, side by side in one process.

The scheduler core and the executor's ModelRunner run in this process (no gRPC hops), on the model
`radixserve serve` serves by default (the embedded SmolLM2-135M-Instruct, or --model-path), with every
server flag available. Each round serves the prompt set (tests/data/speculative_prompts.json: code to
repeat with a variable renamed, greedy) one request at a time, once without speculation and once with
--speculative-algorithm (NGRAM by default), alternating which goes first, so that noise from other work
on the machine falls on both. EAGLE drafts on the executor, so it gets a runner of its own (the plain
configuration keeps the fast decode paths an EAGLE runner turns off). Per round and configuration it prints the generated tokens, tokens/s and the
average accepted length per verify step, then the totals and whether both produced the same tokens.

  python scripts/bench_speculative.py --rounds 3 --max-new-tokens 256 [--speculative-num-draft-tokens 9]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

from radixserve.cli import quiet_openmp_threads

quiet_openmp_threads()  # as the executor's process does, before torch loads its OpenMP runtime

from radixserve.common.args import add_server_args, args_from_namespace  # noqa: E402
from radixserve.common.sampling import SamplingParams, StoppingCriteria  # noqa: E402
from radixserve.common.step import StepInput  # noqa: E402
from radixserve.scheduler.core import Scheduler  # noqa: E402
from radixserve.scheduler.request import Request  # noqa: E402

PROMPTS = (
    pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "speculative_prompts.json"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_args(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--num-prompts", type=int, default=None, help="the first N prompts (default all)"
    )
    p.add_argument("--prompts-file", default=str(PROMPTS))
    return p


def prompt_ids(tokenizer, prompts: list[dict]) -> list[list[int]]:
    texts = [
        tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def serve_one(runner, sched: Scheduler, rid: str, ids: list[int], max_new: int) -> list[int]:
    sched.add_request(
        Request(rid, list(ids), StoppingCriteria(max_new), sampling=SamplingParams(temperature=0))
    )
    tokens: list[int] = []
    while (plan := sched.schedule()) is not None:
        out = runner.step(plan)
        for ev in sched.update(plan, out.outputs, out.prompt_logprobs):
            tokens += ev.token_ids
    runner.step(StepInput(0, finished_request_ids=sched._pending_finished))
    sched._pending_finished = []
    error = sched.check_leak(deep=True)
    if error:
        raise SystemExit(f"KV accounting: {error}")
    return tokens


def run_config(runner, sched, prompts, max_new, tag) -> dict:
    sched.flush_cache()  # every configuration starts from a cold prefix cache
    before = dataclasses.replace(sched.spec_stats)
    t0 = time.perf_counter()
    outputs = [
        serve_one(runner, sched, f"{tag}-{i}", ids, max_new) for i, ids in enumerate(prompts)
    ]
    wall = time.perf_counter() - t0
    spec = sched.spec_stats
    steps = spec.verify_steps - before.verify_steps
    accepted = spec.accepted_tokens - before.accepted_tokens
    generated = sum(len(o) for o in outputs)
    return {
        "tokens": generated,
        "seconds": wall,
        "tokens_per_s": generated / wall,
        "accept_length": 1 + accepted / steps if steps else None,
        "verify_steps": steps,
        "outputs": outputs,
    }


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    args = args_from_namespace(ns, "serve")
    if args.speculative_algorithm is None:
        args = dataclasses.replace(args, speculative_algorithm="NGRAM")
    plain_args = dataclasses.replace(args, speculative_algorithm=None)
    label = args.speculative_algorithm.lower()
    from transformers import AutoTokenizer

    from radixserve.executor.runner import ModelRunner
    from radixserve.executor.warmup import run_warmup
    from radixserve.scheduler.server import build_core

    # NGRAM drafts on the scheduler: one runner serves both (made with NGRAM's flags, so it keeps
    # the spare rows tree drafts need).
    shared_args = args if args.speculative_algorithm == "NGRAM" else plain_args
    runner = ModelRunner.from_args(shared_args)
    run_warmup(runner, shared_args)
    runners = {"plain": runner, "ngram": runner}
    if args.speculative_algorithm != "NGRAM":  # a draft head: the executor drafts
        runners["ngram"] = ModelRunner.from_args(args)
        run_warmup(runners["ngram"], args)
    info = runner.model_info()
    tokenizer = AutoTokenizer.from_pretrained(info.model_path)
    prompts = json.loads(pathlib.Path(ns.prompts_file).read_text())["prompts"][: ns.num_prompts]
    ids = prompt_ids(tokenizer, prompts)
    model = _ModelFacts(
        info.kv_slots,
        info.context_length,
        info.eos_token_ids,
        info.max_graph_tokens,
        info.max_tree_draft_tokens,
    )
    configs = {"plain": build_core(plain_args, model), "ngram": build_core(args, model)}
    print(
        f"model {info.model_path} ({info.architecture}, {info.dtype}, {info.device}), "
        f"{len(ids)} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens, "
        f"max {ns.max_new_tokens} new tokens, bs 1, draft tokens per step "
        f"{configs['ngram'].decode.spec.max_draft_tokens}",
        flush=True,
    )
    # A warm-up pass of each (not timed): first-call costs of the verify shapes.
    for name, sched in configs.items():
        run_config(runners[name], sched, ids[:1], 32, f"warm-{name}")
    totals = {name: {"tokens": 0, "seconds": 0.0} for name in configs}
    same = True
    for r in range(ns.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        results = {}
        for name in order:
            results[name] = run_config(
                runners[name], configs[name], ids, ns.max_new_tokens, f"{r}-{name}"
            )
            totals[name]["tokens"] += results[name]["tokens"]
            totals[name]["seconds"] += results[name]["seconds"]
        for i, (a, b) in enumerate(zip(results["plain"]["outputs"], results["ngram"]["outputs"])):
            if a != b:
                same = False
                at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(
                    f"  prompt {i}: outputs differ from token {at} ({len(a)} and {len(b)} tokens)"
                )
        p, n = results["plain"], results["ngram"]
        print(
            f"round {r + 1} ({' then '.join(order)}): plain {p['tokens']} tok in {p['seconds']:.1f}s "
            f"= {p['tokens_per_s']:.1f} tok/s | {label} {n['tokens']} tok in {n['seconds']:.1f}s = "
            f"{n['tokens_per_s']:.1f} tok/s, accept length {n['accept_length'] or 0:.2f} "
            f"| speed-up {n['tokens_per_s'] / p['tokens_per_s']:.2f}x",
            flush=True,
        )
    rate = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
    spec = configs["ngram"].spec_stats
    print(
        f"total: plain {rate['plain']:.1f} tok/s, {label} {rate['ngram']:.1f} tok/s "
        f"({rate['ngram'] / rate['plain']:.2f}x), accept length {spec.accept_length:.2f}; "
        f"outputs {'identical' if same else 'DIFFER'} with and without speculation"
    )
    return 0


@dataclasses.dataclass
class _ModelFacts:
    """What build_core reads of ExecutorModelInfo."""

    kv_slots: int
    context_length: int
    eos_token_ids: list[int]
    max_graph_tokens: int = 0
    max_tree_draft_tokens: int = 0


if __name__ == "__main__":
    sys.exit(main())
