"""`radixserve check-comm`: do torch.distributed collectives work across these ranks, and how fast?

Each rank runs an all-reduce (the sum of the ranks), an all-gather (every rank's id), a broadcast from
rank 0 (a tensor and a Python object) and a timed all-reduce of a large tensor (bandwidth as
nccl-tests reports it: algbw = bytes / time, busbw = algbw * 2 (n - 1) / n), then prints one JSON
line. Exit code 1 when any result differs from what it must be, 2 when the group cannot form.

Ranks come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) when
it is set, e.g. `torchrun --nnodes 2 --nproc-per-node 8 ... -m radixserve.cli check-comm`; otherwise
`--nproc N` starts N local ranks (default 1). NCCL ranks use cuda:<local rank>, gloo ranks the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time

# Test hook (not a flag): the rank named here contributes wrong values, so the checks must fail.
FAULT_ENV = "RADIXSERVE_CHECK_COMM_FAULT_RANK"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BROADCAST_OBJECT = {"from": 0, "text": "radixserve check-comm", "ids": [1, 2, 3]}
BROADCAST_NUMEL = 4096


def _emit(result: dict) -> None:
    """One JSON line in one write: ranks share stdout, and print's separate newline can interleave."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=["nccl", "gloo"],
        default=None,
        help="process-group backend (default: nccl when CUDA is available, else gloo)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="start this many local ranks (ignored under torchrun, which starts the ranks)",
    )
    parser.add_argument(
        "--size-mb",
        type=float,
        default=None,
        help="MiB all-reduced for the bandwidth figure (default: 256 for nccl, 16 for gloo)",
    )
    parser.add_argument("--iters", type=int, default=5, help="timed all-reduces of that tensor")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds the ranks wait for each other"
    )


def check(got, expected) -> dict:
    """One comparison as it is reported."""
    return {"ok": got == expected, "got": got, "expected": expected}


def bus_bandwidth(nbytes: int, seconds: float, world: int) -> dict:
    algbw = nbytes / seconds / 1e9
    return {"algbw_GBps": round(algbw, 3), "busbw_GBps": round(algbw * 2 * (world - 1) / world, 3)}


def run_checks(
    rank: int, world: int, device, size_mb: float, iters: int, faulty: bool = False
) -> dict:
    """The checks of one rank, in a formed default process group; faulty: contribute wrong values."""
    import torch
    import torch.distributed as dist

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    bad = 1 if faulty else 0
    checks = {}
    value = torch.tensor([float(rank + bad)], device=device)
    dist.all_reduce(value)
    checks["all_reduce"] = check(value.item(), float(world * (world - 1) // 2))

    parts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(parts, torch.tensor([rank + bad], dtype=torch.int64, device=device))
    checks["all_gather"] = check([int(p.item()) for p in parts], list(range(world)))

    expected = torch.arange(BROADCAST_NUMEL, dtype=torch.float32, device=device) * 0.5
    payload = expected.clone() if rank == 0 else torch.zeros_like(expected)
    dist.broadcast(payload, src=0)
    checks["broadcast"] = check(
        float((payload != expected).sum().item()), 0.0
    )  # entries that differ
    box = [BROADCAST_OBJECT if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    checks["broadcast_object"] = check(box[0], BROADCAST_OBJECT)

    numel = max(1, int(size_mb * 2**20) // 4)
    big = torch.ones(numel, dtype=torch.float32, device=device)
    dist.all_reduce(big)  # warm-up (connections, buffers)
    big.fill_(1.0)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(big)
        big.div_(world)  # stays 1 when every rank took part
    sync()
    seconds = (time.perf_counter() - t0) / max(1, iters)
    checks["large_all_reduce"] = check(float(big[-1].item()), 1.0)
    bandwidth = {
        "bytes": numel * 4,
        "iters": iters,
        "avg_ms": round(seconds * 1e3, 3),
        **bus_bandwidth(numel * 4, seconds, world),
    }
    return {
        "rank": rank,
        "world_size": world,
        "backend": dist.get_backend(),
        "device": str(device),
        "host": socket.gethostname(),
        "ok": all(c["ok"] for c in checks.values()),
        "checks": checks,
        "bandwidth": bandwidth,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def run_rank(ns: argparse.Namespace) -> int:
    """This process as the rank its environment names; prints its JSON line."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = ns.backend or _default_backend()
    if backend == "nccl":
        if not torch.cuda.is_available():
            _emit({"rank": rank, "ok": False, "error": "nccl needs CUDA; use --backend gloo"})
            return 2
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    size_mb = ns.size_mb if ns.size_mb is not None else (256.0 if backend == "nccl" else 16.0)
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=ns.timeout),
        )
    except Exception as e:  # noqa: BLE001 - reported, not raised
        _emit({"rank": rank, "ok": False, "error": f"cannot form the group: {e}"})
        return 2
    try:
        faulty = os.environ.get(FAULT_ENV) == str(rank)
        result = run_checks(rank, world, device, size_mb, ns.iters, faulty)
    finally:
        dist.destroy_process_group()
    _emit(result)
    return 0 if result["ok"] else 1


def spawn_local(ns: argparse.Namespace, argv: list[str]) -> int:
    """--nproc N: N copies of this command as ranks 0..N-1 on this host; 0 when every rank passed."""
    port = str(_free_port())
    procs = []
    for rank in range(ns.nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(ns.nproc),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(ns.nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen([sys.executable, "-m", "radixserve.cli", "check-comm", *argv], env=env)
        )
    deadline = time.monotonic() + ns.timeout + 60
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    failed = [rank for rank, code in enumerate(codes) if code != 0]
    print(
        f"check-comm: {ns.nproc - len(failed)} of {ns.nproc} ranks passed"
        + (f"; failed: ranks {failed} (exit codes {[codes[r] for r in failed]})" if failed else ""),
        file=sys.stderr,
        flush=True,
    )
    return max([1] + [code for code in codes if code > 0]) if failed else 0


def main(ns: argparse.Namespace, argv: list[str]) -> int:
    """ns: the parsed check-comm flags; argv: the same flags as given (handed to spawned ranks)."""
    if all(name in os.environ for name in TORCHRUN_ENV):
        return run_rank(ns)
    if ns.nproc < 1:
        print("check-comm: --nproc must be at least 1", file=sys.stderr)
        return 2
    return spawn_local(ns, argv)
