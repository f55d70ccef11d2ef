"""Tensor-parallel state of this process: its rank, the group size, the process groups, and the few
collectives the parallel layers and the step broadcast use.

Until init_tensor_parallel runs (always, at --tp-size 1) the process is rank 0 of a group of one and
every collective here is a no-op, so layers and models never special-case tp=1.

Two process groups: the data group (NCCL on CUDA, gloo on CPU) carries the activations (all-reduce,
all-gather); the control group (always gloo, on the host) carries each step's inputs from rank 0 to the
others and small integer agreements (KV slots). The control group has a very long timeout because a
shard waits on it for the next step for as long as the server is idle; a dead peer still shows at once
(gloo reports the closed connection).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("radixserve.executor.parallel_state")

CONTROL_TIMEOUT = datetime.timedelta(days=3650)


@dataclass
class _TensorParallel:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank among the shards of this node (its device index on CUDA)
    local_size: int = 1  # shards on this node
    control_group: Any = None
    ep_size: int = 1  # expert-parallel groups the MoE experts are split over (divides size)


_state = _TensorParallel()


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.size


def tp_local_rank() -> int:
    return _state.local_rank


def tp_local_size() -> int:
    return _state.local_size


def ep_size() -> int:
    return _state.ep_size


def data_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tensor_parallel(
    rank: int,
    size: int,
    local_rank: int,
    local_size: int,
    store: dist.Store,
    device: torch.device,
    ep_size: int = 1,
) -> None:
    """Join the group of `size` shards through `store` (a TCPStore all shards reach) as `rank`; MoE
    layers split their experts over ep_size groups of them (--ep-size)."""
    if ep_size < 1 or size % ep_size:
        raise ValueError(
            f"expert-parallel size {ep_size} does not divide the tensor-parallel size {size}"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        data_backend(device),
        store=store,
        rank=rank,
        world_size=size,
        device_id=device if device.type == "cuda" else None,
    )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    global _state
    _state = _TensorParallel(rank, size, local_rank, local_size, control, ep_size)
    log.info(
        "tensor-parallel shard %d of %d (local %d of %d) on %s, %s, expert-parallel size %d",
        rank,
        size,
        local_rank,
        local_size,
        device,
        data_backend(device),
        ep_size,
    )


def destroy_tensor_parallel() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = _TensorParallel()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the shards, in place; returns x."""
    if _state.size > 1:
        dist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """The elementwise max of x over the shards, in place; returns x."""
    if _state.size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The shards' x side by side along the last dimension, rank order (every shard gets it)."""
    if _state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """x as rank 0 has it, on every shard, in place over the data group (on CUDA queued on the
    stream like any kernel: nothing waits for the device); returns x."""
    if _state.size > 1:
        dist.broadcast(x, src=0)
    return x


def agree_int(value: int, op: str) -> int:
    """value reduced over the shards with op ("min" or "sum"), over the control group."""
    if _state.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(
        t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM, group=_state.control_group
    )
    return int(t.item())


def broadcast_control(message: Any) -> None:
    """Rank 0: send a picklable message to every other shard (they call receive_control)."""
    if _state.size > 1:
        dist.broadcast_object_list([message], src=0, group=_state.control_group)


def receive_control() -> Any:
    """Shards other than rank 0: wait for rank 0's next broadcast_control message."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=_state.control_group)
    return box[0]
