"""Speculative serving on a tensor-parallel group of CPU processes (gloo), for
tests/executor/test_eagle_tensor_parallel.py.

`python -m tests.executor.eagle_tp_ranks --rank R --world N --port P --out FILE CASE...`, each CASE
`ALGORITHM:TARGET_DIR:HEAD_DIR` (ALGORITHM `none` for plain decoding, `NGRAM` with no HEAD_DIR): every
shard builds the runner with that draft (the head's layers split over the shards like the target's),
rank 0 serves `requests` through the scheduler core and TensorParallelLeader (the gRPC servicer's path)
while the others follow, and saves {case: outcome} to FILE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from radixserve.executor.parallel_state import destroy_tensor_parallel
from radixserve.executor.step_broadcast import follow
from tests.executor.test_eagle_serving import CHUNKED, make_runner, make_scheduler, prompts
from tests.spec_serving import greedy, run
from tests.stack import free_ports
from tests.tp_ranks import group_leader, group_parser, join_group, spawn_ranks

NGRAM = dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=4)


def requests() -> list:
    """Five greedy requests of 3-30 prompt tokens (chunked by 8), 12-24 new tokens, logprobs on some."""
    return [
        (f"r{i}", p, 12 + 3 * i, greedy(return_logprob=i % 2 == 0), {})
        for i, p in enumerate(prompts(5, 5))
    ]


def serve(runner_for_step, runner, algorithm: str | None, head: str | None) -> dict:
    """Serve requests() with algorithm (runner built by build_runner); tokens, logprobs, finish
    reasons and the spec stats."""
    if algorithm == "NGRAM":  # drafts from the scheduler's n-gram lookup: the runner is plain
        sched = make_scheduler(runner, **NGRAM, **CHUNKED)
    else:
        sched = make_scheduler(runner, algorithm, head, **CHUNKED)
    tokens, logprobs, finals = run(runner_for_step, sched, requests())
    return {
        "tokens": tokens,
        "logprobs": logprobs,
        "finish": {rid: str(ev.finish_reason) for rid, ev in finals.items()},
        "spec": dataclasses.asdict(sched.spec_stats),
    }


def parse_case(case: str) -> tuple[str | None, str, str | None]:
    algorithm, target, head = case.split(":")
    return (None, target, None) if algorithm == "none" else (algorithm, target, head or None)


def build_runner(algorithm: str | None, target: str, head: str | None):
    """The runner of a case (an executor serving NGRAM has no draft)."""
    if algorithm == "NGRAM":
        return make_runner(Path(target))
    return make_runner(Path(target), algorithm, head)


def run_cases_on_ranks(cases: list[str], out: Path, world: int = 2) -> dict[str, dict]:
    """serve() of each case on `world` shards; {case: what rank 0 returned}."""
    (port,) = free_ports(1)
    argv = ["--world", str(world), "--port", str(port), "--out", str(out), *cases]
    return spawn_ranks("tests.executor.eagle_tp_ranks", world, argv, out, timeout=300)


def main() -> None:
    parser = group_parser()
    parser.add_argument("--out", required=True)
    parser.add_argument("cases", nargs="+")
    ns = parser.parse_args()
    join_group(ns.rank, ns.world, ns.port)
    results = {}
    for case in ns.cases:
        algorithm, target, head = parse_case(case)
        runner = build_runner(algorithm, target, head)
        if ns.rank == 0:
            leader = group_leader(runner)
            results[case] = serve(leader, runner, algorithm, head)
            leader.stop()
        else:
            follow(runner)
    if ns.rank == 0:
        torch.save(results, ns.out)
    destroy_tensor_parallel()


if __name__ == "__main__":
    main()
