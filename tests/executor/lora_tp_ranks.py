"""One LoRA scenario on a tensor-parallel group of CPU processes (gloo), for test_lora_tensor_parallel.py.

`python -m tests.executor.lora_tp_ranks --rank R --world N --port P --model DIR --adapters DIR --out FILE`:
rank 0 drives `lora_scenario` through TensorParallelLeader (adapters of --lora-paths at start, one more
loaded at run time on every shard) and saves what it returned; the other ranks follow. With
`--scenario warmup` (test_lora_warmup.py), rank 0 drives `warmup_scenario` instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.parallel_state import destroy_tensor_parallel
from radixserve.executor.runner import ModelRunner
from radixserve.executor.step_broadcast import follow
from tests.configs import runner_config
from tests.stack import free_ports
from tests.tp_ranks import group_leader, group_parser, join_group, on_cpu, spawn_ranks

AT_START = ("qv4", "all8")  # --lora-paths; mix16 is loaded at run time
# Decode steps after the prefill: the same path each, seconds each in the Triton interpreter.
GREEDY = 10


def build_lora_runner(model: str, adapters: Path, backend: str = "triton") -> ModelRunner:
    return ModelRunner(
        model,
        runner_config(
            dtype="float32",
            device="cpu",
            max_total_tokens=1024,
            attention_backend="torch_native",
            lora_paths=" ".join(f"{n}={adapters / n}" for n in AT_START),
            max_loras_per_batch=3,
            max_lora_rank=16,
            lora_backend=backend,
        ),
    )


def lora_scenario(runner, adapters: Path) -> dict:
    """Prefill of the base model and three adapters in one step, then greedy decoding of all four."""
    runner.load_lora("mix16", str(adapters / "mix16"))
    names = ["", "qv4", "all8", "mix16"]
    prompts = [list(range(3 + 7 * i, 3 + 7 * i + 5 + i)) for i in range(4)]
    free = iter(range(1, 1024))
    new = [
        NewRequest(f"r{i}", p, [next(free) for _ in p], lora_name=n)
        for i, (n, p) in enumerate(zip(names, prompts))
    ]
    step = runner.step(StepInput(1, new_requests=new))
    out = {"prefill": step.logits, "tokens": [[o.token_id] for o in step.outputs]}
    decode = []
    for s in range(GREEDY):
        cont = [ContinuingRequest(f"r{i}", [next(free)]) for i in range(4)]
        step = runner.step(StepInput(s + 2, continuing_requests=cont))
        decode.append(step.logits)
        for i, o in enumerate(step.outputs):
            out["tokens"][i].append(o.token_id)
    out["decode"] = torch.stack(decode)
    runner.unload_lora("qv4")
    out["loaded"] = sorted(a["name"] for a in runner.model_info().lora_adapters)
    return out


def warmup_scenario(runner) -> dict:
    """The executor's warm-up (the CPU plan, LoRA scenarios included), then a prefill on qv4 beside the
    base model: its logits, the warm-up report and the adapters loaded after it."""
    from types import SimpleNamespace

    from radixserve.executor.warmup import run_warmup

    args = SimpleNamespace(
        max_prefill_tokens=16384, chunked_prefill_size=8192, max_running_requests=None
    )
    report = run_warmup(runner, args)
    new = [
        NewRequest("a", list(range(3, 12)), list(range(1, 10)), lora_name="qv4"),
        NewRequest("b", list(range(5, 11)), list(range(10, 16))),
    ]
    step = runner.step(StepInput(1, new_requests=new))
    return {
        "prefill": step.logits,
        "failed": report.failed,
        "skipped": report.skipped,
        "loaded": sorted(a["name"] for a in runner.model_info().lora_adapters),
    }


def run_lora_group(
    model: Path, adapters: Path, out: Path, world: int = 2, scenario: str = "adapters"
) -> dict:
    (port,) = free_ports(1)
    argv = ["--world", str(world), "--port", str(port), "--model", str(model)]
    argv += ["--adapters", str(adapters), "--out", str(out), "--scenario", scenario]
    return spawn_ranks("tests.executor.lora_tp_ranks", world, argv, out, timeout=240)


def main() -> None:
    parser = group_parser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapters", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenario", choices=["adapters", "warmup"], default="adapters")
    ns = parser.parse_args()
    join_group(ns.rank, ns.world, ns.port)
    warmup = ns.scenario == "warmup"
    runner = build_lora_runner(ns.model, Path(ns.adapters), "torch" if warmup else "triton")
    if ns.rank == 0:
        leader = group_leader(runner)
        if warmup:
            result = warmup_scenario(leader)
        else:
            result = lora_scenario(leader, Path(ns.adapters))
        leader.stop()
        torch.save(on_cpu(result), ns.out)
    else:
        follow(runner)
    destroy_tensor_parallel()


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
