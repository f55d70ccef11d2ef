"""Several models, one after another, on one tensor-parallel group of CPU processes (gloo): what
tests/tp_ranks.py does for one model, without starting the processes again for each.

`python -m tests.executor.dense_tp_ranks --rank R --world N --port P --out FILE MODEL_DIR...`: rank 0
drives tp_ranks.scenario on each model through TensorParallelLeader and saves {model dir: result} to
FILE; the other ranks follow.
"""

from __future__ import annotations

from pathlib import Path

import torch

from radixserve.executor.parallel_state import destroy_tensor_parallel
from radixserve.executor.step_broadcast import follow
from tests.stack import free_ports
from tests.tp_ranks import (
    build_runner,
    group_leader,
    group_parser,
    join_group,
    on_cpu,
    scenario,
    spawn_ranks,
)


def run_models_on_two_ranks(models: list[Path], out: Path) -> dict[str, dict]:
    """The scenario on each model with TP=2; {str(model dir): what rank 0 returned}."""
    (port,) = free_ports(1)
    argv = ["--world", "2", "--port", str(port), "--out", str(out), *map(str, models)]
    return spawn_ranks("tests.executor.dense_tp_ranks", 2, argv, out, timeout=240)


def main() -> None:
    parser = group_parser()
    parser.add_argument("--out", required=True)
    parser.add_argument("models", nargs="+")
    ns = parser.parse_args()
    join_group(ns.rank, ns.world, ns.port)
    results = {}
    for model in ns.models:
        runner = build_runner(model)
        if ns.rank == 0:
            leader = group_leader(runner)
            results[model] = on_cpu(scenario(leader))
            leader.stop()
        else:
            follow(runner)
    if ns.rank == 0:
        torch.save(results, ns.out)
    destroy_tensor_parallel()


if __name__ == "__main__":
    main()
