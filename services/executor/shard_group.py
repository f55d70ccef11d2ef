"""The processes of a tensor-parallel executor (--tp-size N > 1) and how they find each other.

One process per shard. The first shard of each node (rank node_rank * N / nnodes; on node 0 that is
rank 0, the executor the scheduler talks to) starts the node's other shards as `radixserve executor
--tp-rank R` and watches them: if one exits unasked, it exits 1 itself, its remaining shards follow
(they get SIGTERM when their parent dies, and the others' collectives fail), and the supervisor
restarts the executor, which starts the whole group again. Nodes other than 0 run only shards, whose
first shard is what their supervisor restarts.

Rendezvous is a TCPStore served by rank 0: at --dist-init-addr HOST:PORT (needed with --nnodes > 1),
or on a free loopback port that rank 0 hands to its shards. Devices: cuda:<--base-gpu-id + local rank> on
CUDA (`serve --dp-size N` gives replica i base id i * tp_size), every shard on the CPU otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from radixserve.common.args import ServerArgs
from radixserve.executor.model_config import resolve_device
from radixserve.executor.parallel_state import init_tensor_parallel
from radixserve.supervisor import _child_setup, describe_exit, stop_processes

log = logging.getLogger("radixserve.executor.shard_group")

STORE_TIMEOUT = datetime.timedelta(minutes=10)  # how long shards wait for each other to join
WATCH_POLL_S = 0.5


@dataclass(frozen=True)
class ShardLayout:
    rank: int
    size: int
    local_rank: int  # among this node's shards
    local_size: int  # shards per node

    @classmethod
    def from_args(cls, args: ServerArgs) -> "ShardLayout":
        per_node = args.tp_size // args.nnodes
        first = args.node_rank * per_node
        rank = first if args.tp_rank is None else args.tp_rank
        return cls(rank, args.tp_size, rank - first, per_node)

    @property
    def starts_node_shards(self) -> bool:
        return self.local_rank == 0 and self.local_size > 1


def shard_device(
    requested: str, local_rank: int, local_size: int, base_gpu_id: int = 0
) -> torch.device:
    """cuda:<base_gpu_id + local rank> (--device auto on a CUDA machine, or cuda), else the CPU."""
    device = resolve_device(requested)
    if device.type != "cuda":
        return device
    if requested not in ("auto", "cuda"):
        raise ValueError(
            f"--device {requested}: shard k of a node takes cuda:(--base-gpu-id + k); "
            "pick the GPUs with CUDA_VISIBLE_DEVICES and --base-gpu-id, and pass --device cuda"
        )
    if torch.cuda.device_count() < base_gpu_id + local_size:
        raise ValueError(
            f"{local_size} shards per node from --base-gpu-id {base_gpu_id} but "
            f"{torch.cuda.device_count()} CUDA devices visible"
        )
    return torch.device("cuda", base_gpu_id + local_rank)


def open_store(args: ServerArgs, layout: ShardLayout) -> tuple[dist.TCPStore, str]:
    """The group's TCPStore (served by rank 0) and the HOST:PORT the other shards reach it at."""
    if args.dist_init_addr:
        host, _, port = args.dist_init_addr.rpartition(":")
    elif layout.rank == 0:
        host, port = "127.0.0.1", "0"
    else:
        raise ValueError("a tensor-parallel shard other than rank 0 needs --dist-init-addr")
    store = dist.TCPStore(
        host.strip("[]"),
        int(port),
        layout.size,
        is_master=layout.rank == 0,
        timeout=STORE_TIMEOUT,
        wait_for_workers=False,
    )
    return store, f"{host}:{store.port}"


def join_group(args: ServerArgs, layout: ShardLayout, store: dist.Store) -> ServerArgs:
    """Join the process group on the calling thread (the one that runs torch); the args to build this
    shard's runner with (its device)."""
    device = shard_device(args.device, layout.local_rank, layout.local_size, args.base_gpu_id)
    init_tensor_parallel(
        layout.rank, layout.size, layout.local_rank, layout.local_size, store, device, args.ep_size
    )
    return dataclasses.replace(args, device=str(device))


class NodeShards:
    """The node's other shards, started and watched by its first shard (call from the main thread:
    the shards get SIGTERM when the thread that started them ends)."""

    def __init__(self, args: ServerArgs, layout: ShardLayout, dist_init_addr: str):
        self.procs: dict[str, subprocess.Popen] = {}
        self._stopping = threading.Event()
        for local in range(1, layout.local_size):
            rank = layout.rank + local
            own = dataclasses.replace(args, tp_rank=rank, dist_init_addr=dist_init_addr)
            cmd = [sys.executable, "-m", "radixserve.cli", "executor", *own.to_cli()]
            proc = subprocess.Popen(cmd, preexec_fn=_child_setup)
            log.info("started tensor-parallel shard %d (pid %d)", rank, proc.pid)
            self.procs[f"shard {rank}"] = proc
        threading.Thread(target=self._watch, name="shard-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_POLL_S):
            for name, proc in self.procs.items():
                if proc.poll() is not None and not self._stopping.is_set():
                    log.critical(
                        "tensor-parallel %s exited with %s; exiting so the executor restarts with all "
                        "its shards",
                        name,
                        describe_exit(proc.returncode),
                    )
                    for handler in logging.getLogger().handlers:
                        handler.flush()
                    os._exit(1)

    def stop(self, timeout: float) -> None:
        """Wait up to timeout for the shards to exit (after a stop message), then terminate them."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        stop_processes(self.procs, timeout)
