"""LoraLinear: a base linear layer (any quantization) plus the batched LoRA deltas of its tokens' adapters.

y = base(x) + scale[slot] * (x @ A[slot]^T) @ B[slot]^T per token, slot = the GPU slot of the token's
adapter (-1: none). The A and B of every slot live in fixed buffers, a [slots, shards * R, in] and
b [slots, out, shards * R] (R = --max-lora-rank), so a CUDA graph captures their addresses once:
a fused layer (qkv: shards q, k, v; gate_up: gate, up) stacks each shard's A in its own R rows and
its B in those R columns of its own output rows (B block-diagonal), and one shrink + one expand
(kernels/lora.py) cover it. An adapter of rank r < R fills r of its R rows (the rest stay zero).

Tensor parallelism, matching the base layer's split:
- column-parallel (qkv_proj, gate_up_proj): A whole on every rank, B split on its output rows as the
  base weight is (q by heads, k/v by kv heads, replicated where kv heads are fewer than ranks);
- row-parallel (o_proj, down_proj): A split on its input columns as the base weight is; each rank's
  shrink is a partial sum, all-reduced (a [T, R] float32 tensor) before the expand; B whole.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from radixserve.executor.lora.adapter import FUSED_SHARDS, LoraError
from radixserve.executor.parallel_state import all_reduce, tp_rank, tp_size


class LoraSlotsState:
    """What every LoraLinear of a model reads at forward time: the step's per-token slot ids and the
    slots' scales (owned and set by LoraManager)."""

    def __init__(self, num_slots: int, device: torch.device, backend: str):
        self.token_slots: torch.Tensor | None = None  # [T] int64, None: no adapter in the step
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.backend = backend  # "triton" | "torch"
        self.device = device
        # The shrink outputs of every LoraLinear of a forward: one float32 buffer zeroed once per
        # forward (one memset, not one per layer; under CUDA graphs captured with the forward), each
        # layer's [T, R] a contiguous view at its own offset (scratch_width: the sum of their R).
        self.scratch_width = 0
        self._scratch: torch.Tensor | None = None

    def reserve_scratch(self, width: int) -> int:
        """A layer's offset (in columns of T rows) in the forward's shrink buffer."""
        self.scratch_width += width
        return self.scratch_width - width

    def new_forward(self) -> None:
        """A model forward begins (a pre-hook on the model, wrap_model's): its buffer is new."""
        self._scratch = None

    def shrink_out(self, tokens: int, offset: int, width: int) -> torch.Tensor:
        """Zeros [tokens, width] for one layer's shrink, from this forward's buffer."""
        if self._scratch is None:
            self._scratch = torch.zeros(
                tokens * self.scratch_width, dtype=torch.float32, device=self.device
            )
        assert self._scratch.numel() == tokens * self.scratch_width, "a forward of two sizes"
        return self._scratch.narrow(0, tokens * offset, tokens * width).view(tokens, width)


def _out_layout(base: nn.Module) -> tuple[list[int], list[int], list[int]]:
    """This rank's output rows of each shard of base: (offsets, sizes, full sizes at tp=1)."""
    tp = tp_size()
    if isinstance(base, QKVParallelLinear):
        q, kv = base.num_heads * base.head_dim, base.num_kv_heads * base.head_dim
        full_kv = base.total_num_kv_heads * base.head_dim
        return [0, q, q + kv], [q, kv, kv], [q * tp, full_kv, full_kv]
    if isinstance(base, MergedColumnParallelLinear):
        sizes = list(base.output_sizes)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        return offsets, sizes, [s * tp for s in sizes]
    return [0], [base.out_features], [base.out_features * (1 if _row(base) else tp)]


def _row(base: nn.Module) -> bool:
    return isinstance(base, RowParallelLinear)


class LoraLinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        name: str,
        state: LoraSlotsState,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.base, self.name, self.state = base, name, state
        self.shards = FUSED_SHARDS[name]
        self.max_rank = max_rank
        self.offsets, self.sizes, self.full_sizes = _out_layout(base)
        assert len(self.sizes) == self.shards, (name, self.sizes)
        self.row_parallel = _row(base)
        self.in_local = base.in_features
        self.full_in = self.in_local * (tp_size() if self.row_parallel else 1)
        device = next(base.parameters()).device
        stacked = self.shards * max_rank
        self.register_buffer(
            "lora_a", torch.zeros(num_slots, stacked, self.in_local, dtype=dtype, device=device)
        )
        self.register_buffer(
            "lora_b",
            torch.zeros(num_slots, base.out_features, stacked, dtype=dtype, device=device),
        )
        self.scratch_offset = state.reserve_scratch(stacked)

    def slice_for_rank(
        self, shard: int, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of one shard's whole A [r, in] and B [out, r] (checked against the base)."""
        if a.shape[1] != self.full_in or b.shape[0] != self.full_sizes[shard]:
            raise LoraError(
                f"{self.name} shard {shard}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                f"the base layer (in {self.full_in}, out {self.full_sizes[shard]})"
            )
        if self.row_parallel:
            return a.narrow(1, tp_rank() * self.in_local, self.in_local), b
        size = self.sizes[shard]
        rank = tp_rank()
        if isinstance(self.base, QKVParallelLinear) and shard > 0:
            rank //= self.base.kv_replicas
        return a, b.narrow(0, rank * size, size)

    def fill_slot(self, slot: int, parts) -> None:
        """Copy an adapter's parts for this layer (adapter.ShardPart list; empty: none) into slot."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        R = self.max_rank
        for p in parts:
            r = p.a.shape[0]
            rows = slice(p.shard * R, p.shard * R + r)
            self.lora_a[slot, rows].copy_(p.a, non_blocking=True)
            out = slice(self.offsets[p.shard], self.offsets[p.shard] + self.sizes[p.shard])
            self.lora_b[slot, out, rows].copy_(p.b, non_blocking=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        slots = self.state.token_slots
        if slots is None:
            return y
        from radixserve.kernels import lora as kernels

        if not y.is_contiguous():  # the expand adds into it in place, through a 2-d view
            y = y.contiguous()
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        if self.state.backend == "torch":
            s = kernels.shrink_reference(x2, self.lora_a, slots)
            expand = kernels.expand_reference
        else:
            zeros = self.state.shrink_out(x2.shape[0], self.scratch_offset, self.lora_a.shape[1])
            s = kernels.lora_shrink(x2, self.lora_a, slots, out=zeros)
            expand = kernels.lora_expand
        if self.row_parallel and tp_size() > 1:
            s = all_reduce(s)
        expand(y2, s, self.lora_b, self.state.scales, slots)
        return y
