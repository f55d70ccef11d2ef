"""The KV pool: per layer K and V tensors [kv_slots, kv_heads, head_dim]. No allocator here: the
scheduler owns slot ids. Slot 0 is a padding sink that padded reads hit (kept zero, never valid)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("radixserve.executor.kv_cache")

CPU_MAX_KV_TOKENS = 131072
CPU_DEFAULT_MEM_FRACTION = 0.3
CUDA_DEFAULT_MEM_FRACTION = 0.85


class KVPool:
    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_slots, self.num_kv_heads, self.head_dim = num_slots, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        shape = (num_slots, num_kv_heads, head_dim)
        # Only slot 0 is ever read before being written (as padding); it must hold finite values,
        # since a masked-out key still multiplies its value by 0. Not zeroing the rest keeps start fast
        # and, on CPU, leaves untouched pages uncommitted.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for buf in self.k + self.v:
            buf[0].zero_()

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer_id], self.v[layer_id]


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def compute_kv_slots(
    bytes_per_token: int,
    device: torch.device,
    max_total_tokens: int | None,
    mem_fraction_static: float | None,
) -> int:
    """Number of KV slots, including the padding slot 0."""
    if max_total_tokens:
        return max_total_tokens + 1
    if device.type == "cuda":
        # As SGLang: the fraction of the whole device for weights + KV pool; what is in use now (the
        # weights, other processes) comes off it, the rest of the device is left for activations and graphs.
        fraction = mem_fraction_static or CUDA_DEFAULT_MEM_FRACTION
        free, total = torch.cuda.mem_get_info(device)
        budget = free - total * (1 - fraction)
        tokens = int(budget // bytes_per_token)
    else:
        fraction = mem_fraction_static or CPU_DEFAULT_MEM_FRACTION
        tokens = min(int(mem_available_bytes() * fraction // bytes_per_token), CPU_MAX_KV_TOKENS)
    if tokens < 16:
        raise RuntimeError(
            f"not enough memory for a KV cache ({tokens} tokens); lower the model size "
            "or raise --mem-fraction-static / set --max-total-tokens"
        )
    return tokens + 1
