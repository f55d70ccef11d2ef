"""The KV pool: per layer K and V tensors [kv_slots, kv_heads, head_dim] (V's width is v_head_dim:
multi-head latent attention stores one row [latent | rope key] in K and nothing in V, see
attention/mla.py). No allocator here: the scheduler owns slot ids. Slot 0 is a padding sink that padded reads hit (kept zero, never valid).

The pool's dtype is the model's, or fp8 (--kv-cache-dtype fp8_e5m2 | fp8_e4m3): then it holds
x / scale saturated to the fp8 range, with one K and one V scale per layer (kv_scales.py), and
attention reads x = stored * scale."""

from __future__ import annotations

import logging

import torch

from radixserve.executor.kv_scales import KVScales, is_fp8

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
        scales: KVScales | None = None,
        v_head_dim: int | None = None,
    ):
        self.num_slots, self.num_kv_heads, self.head_dim = num_slots, num_kv_heads, head_dim
        self.v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.dtype, self.device = dtype, device
        self.fp8 = is_fp8(dtype)
        scales = scales or KVScales.ones(num_layers)
        assert len(scales.k) == len(scales.v) == num_layers, (len(scales.k), num_layers)
        self.scales = scales
        k_shape = (num_slots, num_kv_heads, head_dim)
        v_shape = (num_slots, num_kv_heads, self.v_head_dim)
        # Only slot 0 is ever read before being written (as padding); it must hold finite values,
        # since a masked-out key still multiplies its value by 0. Not zeroing the rest keeps start fast
        # and, on CPU, leaves untouched pages uncommitted.
        self.k = [torch.empty(k_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(v_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for buf in self.k + self.v:
            buf[0].zero_()

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer_id], self.v[layer_id]

    def layer_scales(self, layer_id: int) -> tuple[float, float]:
        """(k_scale, v_scale) of the layer: stored = x / scale, read back as stored * scale (1.0
        unless the pool is fp8)."""
        return self.scales.k[layer_id], self.scales.v[layer_id]

    def store(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k_cache[slots] = k, v_cache[slots] = v (quantized with the layer's scales when fp8)."""
        k_cache, v_cache = self.layer(layer_id)
        if not self.fp8:
            k_cache.index_copy_(0, slots, k)
            v_cache.index_copy_(0, slots, v)
            return
        k_scale, v_scale = self.layer_scales(layer_id)
        # index_copy_ has no fp8 kernel on the CPU; the bytes copy the same.
        for cache, x, scale in ((k_cache, k, k_scale), (v_cache, v, v_scale)):
            cache.view(torch.uint8).index_copy_(
                0, slots, quantize_kv(x, scale, self.dtype).view(torch.uint8)
            )


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in fp8 dtype, saturated to its finite range (computed in float32)."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-limit, limit).to(dtype)


def kv_bytes_per_token(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    v_head_dim: int | None = None,
) -> int:
    """K and V of one token over every layer, in the pool's dtype (fp8: half of bf16); V is
    v_head_dim wide (head_dim when None)."""
    width = head_dim + (head_dim if v_head_dim is None else v_head_dim)
    return num_layers * num_kv_heads * width * torch.empty((), dtype=dtype).element_size()


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
