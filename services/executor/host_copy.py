"""Host values onto the device, and device results back, without stopping the host.

`torch.tensor(values, device="cuda")` (and `cpu_tensor.to("cuda")`) copies from pageable memory with
non_blocking=False, which PyTorch completes with a stream synchronization: the host waits until every
kernel queued before it has run. In a step's launch path that costs the overlap the launch-ahead
scheduler exists for (the host's next step no longer runs while the GPU computes this one). Staged
through pinned memory with non_blocking=True the copy is queued like a kernel; PyTorch's pinned-memory
allocator keeps the staging buffer alive until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """values (a number, a list, nested lists, or a CPU tensor) as a tensor on device, queued on the
    current stream without a synchronization when device is a GPU; dtype as torch.tensor infers it
    when None."""
    device = torch.device(device)
    if isinstance(values, torch.Tensor):
        host = values if dtype is None else values.to(dtype)
    else:
        host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A pinned host copy of a device tensor, queued on the current stream (read it after the stream, or an
    event recorded after this call, has been waited on); None and CPU tensors are returned as they are."""
    if t is None or t.device.type == "cpu":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
