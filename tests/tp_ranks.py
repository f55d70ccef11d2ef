"""A tensor-parallel group of ModelRunners as processes, for tests/executor/test_tensor_parallel.py.

`python -m tests.tp_ranks --rank R --world N --port P --model DIR --out FILE [--device cuda] [--ep E]` runs one
shard (on the CPU over gloo, or on cuda:R over NCCL; MoE experts split over E groups, as --ep-size): rank 0
drives `scenario` through TensorParallelLeader (the gRPC servicer's path) and saves what it returned to
FILE; the other ranks follow it. run_group starts the ranks and returns what rank 0 saved; the tests run the
same scenario on a TP=1 runner and compare.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from radixserve.executor.parallel_state import destroy_tensor_parallel, init_tensor_parallel
from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from radixserve.executor.step_broadcast import TensorParallelLeader, follow
from radixserve.common.step import ContinuingRequest, NewRequest, StepError, StepInput
from tests.stack import free_ports

GREEDY_TOKENS = 24
ATOL = 1e-5  # fp32; the shards' partial sums add up in another order


def build_runner(model: str, device: str = "cpu", quantization: str | None = None) -> ModelRunner:
    return ModelRunner(
        model,
        runner_config(
            dtype="float32",
            device=device,
            max_total_tokens=1024,
            random_seed=0,
            quantization=quantization,
        ),
    )


def on_cpu(result: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}


def scenario(runner) -> dict:
    """Prefill of three prompts, a prefix-reusing request and decodes, a chunked prefill, an invalid step,
    a reset, then greedy decoding; the logits and tokens of each part."""
    out = {}
    step = runner.step(
        StepInput(
            1,
            new_requests=[
                NewRequest("a", list(range(3, 10)), list(range(1, 8))),
                NewRequest("b", list(range(40, 52)), list(range(10, 22))),
                NewRequest("c", [7], [30]),
            ],
        )
    )
    out["prefill"] = step.logits
    step = runner.step(
        StepInput(
            2,
            continuing_requests=[
                ContinuingRequest("b", [40]),
                ContinuingRequest("a", [41]),
                ContinuingRequest("c", [42]),
            ],
            new_requests=[
                NewRequest("d", [90, 91, 92], [50, 51, 52], prefix_slots=list(range(1, 6)))
            ],
        )
    )
    out["decode"] = step.logits
    runner.step(
        StepInput(
            3,
            new_requests=[NewRequest("e", list(range(60, 70)), list(range(60, 70)), sample=False)],
        )
    )
    step = runner.step(
        StepInput(
            4,
            continuing_requests=[
                ContinuingRequest("e", list(range(70, 76)), list(range(100, 106)))
            ],
        )
    )
    out["chunked"] = step.logits
    try:  # invalid on every shard alike: the group carries on
        runner.step(StepInput(5, continuing_requests=[ContinuingRequest("ghost", [77])]))
        out["invalid_step_error"] = None
    except StepError as e:
        out["invalid_step_error"] = str(e)
    out["dropped"] = runner.reset()
    prompt, other = [5, 17, 33, 2, 200, 9, 11, 64, 128], [3, 3, 4]
    step = runner.step(
        StepInput(
            10,
            new_requests=[
                NewRequest("g", prompt, list(range(1, 10))),
                NewRequest("o", other, list(range(20, 23))),
            ],
        )
    )
    tokens = [step.outputs[0].token_id]
    for i in range(GREEDY_TOKENS - 1):
        step = runner.step(
            StepInput(
                11 + i,
                continuing_requests=[
                    ContinuingRequest("o", [200 + i]),
                    ContinuingRequest("g", [300 + i]),
                ],
            )
        )
        tokens.append(step.outputs[1].token_id)
    out["greedy"] = tokens
    return out


def group_parser() -> argparse.ArgumentParser:
    """A rank script's arguments: --rank, --world and --port (join_group's), then its own."""
    parser = argparse.ArgumentParser()
    for flag in ("--rank", "--world", "--port"):
        parser.add_argument(flag, type=int, required=True)
    return parser


def join_group(rank: int, world: int, port: int, device=torch.device("cpu"), ep: int = 1) -> None:
    """Join the tensor-parallel group of `world` processes (rank 0 hosts the store on port)."""
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        world,
        is_master=rank == 0,
        timeout=datetime.timedelta(seconds=60),
        wait_for_workers=False,
    )
    init_tensor_parallel(rank, world, rank, world, store, device, ep_size=ep)


def group_leader(runner) -> TensorParallelLeader:
    """Rank 0's leader over runner; a broken group raises (the process exits non-zero) instead of exiting."""

    def broken(error):
        raise error

    return TensorParallelLeader(runner, on_broken=broken)


def run_group(
    model: Path,
    out: Path,
    world: int = 2,
    device: str = "cpu",
    ep: int = 1,
    quantization: str | None = None,
) -> dict:
    """The scenario on `world` shards (processes), MoE experts split over `ep` groups, linear layers
    quantized as --quantization says; what rank 0 returned."""
    (port,) = free_ports(1)
    argv = ["--world", str(world), "--port", str(port), "--model", str(model), "--out", str(out)]
    argv += ["--device", device, "--ep", str(ep)]
    argv += ["--quantization", quantization] if quantization else []
    return spawn_ranks("tests.tp_ranks", world, argv, out, timeout=120)


def spawn_ranks(module: str, world: int, argv: list[str], out: Path, timeout: float) -> dict:
    """`python -m module --rank R *argv` for each rank; what rank 0 saved to out."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, "--rank", str(r), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return torch.load(out)


def main() -> None:
    parser = group_parser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--quantization", default=None)
    ns = parser.parse_args()
    device = torch.device("cuda", ns.rank) if ns.device == "cuda" else torch.device("cpu")
    join_group(ns.rank, ns.world, ns.port, device, ns.ep)
    runner = build_runner(ns.model, str(device), ns.quantization)
    if ns.rank == 0:
        leader = group_leader(runner)
        result = scenario(leader)
        result["kv_slots"] = leader.model_info().kv_slots
        result["moe_local_experts"] = sorted(
            {m.num_local_experts for m in runner.model.modules() if hasattr(m, "num_local_experts")}
        )
        leader.stop()
        torch.save(on_cpu(result), ns.out)
    else:
        follow(runner)
    destroy_tensor_parallel()


if __name__ == "__main__":
    main()
