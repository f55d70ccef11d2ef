"""Mixture-of-experts layers: top-k routing, the stacked experts (kernels/fused_moe.py on CUDA, its torch
reference on CPU) and the sparse block (router + experts + an optional gated shared expert).

Parallelism. The ranks of the tensor-parallel group split a MoE layer two ways (SGLang's layout):
expert parallelism (ep_size, a divisor of tp_size) gives each of ep_size rank groups a contiguous slice
of the experts, [ep_rank * E / ep_size, (ep_rank + 1) * E / ep_size); within a group the tp_size / ep_size
ranks split each expert's intermediate size (gate/up rows, down columns, like the dense MLP). A rank
computes only the (token, expert) pairs routed to its experts, so its output is a partial sum;
reduce_partial_outputs adds them up over the group (an all-reduce; nothing on a single rank).
`--ep-size E` sets ep_size (parallel_state.ep_size(); 1, the default, splits experts by intermediate size
only): rank r is in expert group r // (tp_size / E), so the ranks of one group are consecutive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.executor.layers.linear import ReplicatedLinear
from radixserve.executor.parallel_state import all_reduce, tp_rank, tp_size
from radixserve.executor.parallel_state import ep_size as expert_parallel_size


def default_ep() -> tuple[int, int]:
    """(ep_rank, ep_size) of this process under --ep-size: (tp_rank // (tp_size / ep_size), ep_size)."""
    size = expert_parallel_size()
    return tp_rank() // (tp_size() // size), size


def reduce_partial_outputs(x: torch.Tensor, num_partials: int) -> torch.Tensor:
    """Sum of the partial MoE outputs held by the num_partials ranks of the tensor-parallel group
    (all-reduce, in place); x itself when there is one."""
    if num_partials == 1:
        return x
    return all_reduce(x)


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k]) from router logits [T, E]: softmax in float32, top-k,
    optionally renormalized to sum to 1 (Mixtral always, Qwen MoE by norm_topk_prob)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def select_experts_grouped(
    router_logits: torch.Tensor,
    top_k: int,
    method: str,
    num_groups: int = 1,
    topk_groups: int = 1,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek V2/V3 routing: (weights [T, k] float32, expert ids [T, k]) from router logits [T, E].

    Scores are softmax or sigmoid of the logits (float32). method "greedy": the top-k scores;
    "group_limited_greedy": only experts of the topk_groups groups (of num_groups equal groups)
    with the highest best score; "noaux_tc": experts are chosen by score + correction_bias, groups
    by the sum of their two best such values, and weighted by their plain score. Then optionally
    renormalized to sum to 1, then times scaling_factor."""
    logits = router_logits.float()
    scores = torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if method in ("group_limited_greedy", "noaux_tc") and num_groups > 1:
        grouped = choice.view(choice.shape[0], num_groups, -1)
        if method == "noaux_tc":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.max(dim=-1).values
        groups = group_scores.topk(topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        dropped = 0.0 if method == "group_limited_greedy" else float("-inf")
        choice = grouped.masked_fill(~keep[..., None], dropped).view_as(choice)
    elif method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ValueError(f"unsupported topk_method {method!r}")
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids


class FusedMoE(nn.Module):
    """This rank's experts, stacked: w13_weight [E_local, 2 * I_shard, H] ([gate | up] rows),
    w2_weight [E_local, H, I_shard]; each expert is activation(gate) * up, then down (activation: a
    key of kernels/fused_moe.py's MOE_ACTIVATIONS, SiLU by default)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        ep_rank: int | None = None,
        ep_size: int | None = None,
        activation: str = "silu",
    ):
        super().__init__()
        self.activation = activation
        if ep_rank is None or ep_size is None:
            ep_rank, ep_size = default_ep()
        # Ranks sharing this rank's experts split their intermediate size (one on a single process).
        self.inter_split = max(1, tp_size() // ep_size)
        self.inter_rank = tp_rank() % self.inter_split
        assert num_experts % ep_size == 0, (num_experts, ep_size)
        assert intermediate_size % self.inter_split == 0, (intermediate_size, self.inter_split)
        self.num_experts, self.hidden_size, self.intermediate_size = (
            num_experts,
            hidden_size,
            intermediate_size,
        )
        self.num_local_experts = num_experts // ep_size
        self.expert_start = ep_rank * self.num_local_experts
        self.ep_size = ep_size
        self.intermediate_shard = intermediate_size // self.inter_split
        self.w13_weight = nn.Parameter(
            torch.empty(self.num_local_experts, 2 * self.intermediate_shard, hidden_size),
            requires_grad=False,
        )
        self.w2_weight = nn.Parameter(
            torch.empty(self.num_local_experts, hidden_size, self.intermediate_shard),
            requires_grad=False,
        )
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, expert_id: int, shard_id: str
    ) -> bool:
        """Copy one checkpoint tensor of global expert expert_id: shard_id "gate" or "up" [I, H] (into w13),
        "down" [H, I] (into w2). Returns False (and copies nothing) for an expert of another rank."""
        local = expert_id - self.expert_start
        if not 0 <= local < self.num_local_experts:
            return False
        size = self.intermediate_shard
        begin = self.inter_rank * size
        if shard_id == "down":
            expected = (self.hidden_size, self.intermediate_size)
            src, dst = loaded.narrow(1, begin, size), param.data[local]
        else:
            expected = (self.intermediate_size, self.hidden_size)
            offset = 0 if shard_id == "gate" else size
            src, dst = loaded.narrow(0, begin, size), param.data[local].narrow(0, offset, size)
        if tuple(loaded.shape) != expected:
            raise ValueError(
                f"expert {expert_id} {shard_id}: checkpoint shape {tuple(loaded.shape)}, "
                f"expected {expected}"
            )
        dst.copy_(src)
        return True

    def full_shape(self, param: nn.Parameter) -> tuple[int, ...]:
        """param's shape on a single rank: every expert, the whole intermediate size (see weights.py)."""
        if param is self.w2_weight:
            return (self.num_experts, self.hidden_size, self.intermediate_size)
        return (self.num_experts, 2 * self.intermediate_size, self.hidden_size)

    def load_full(self, param: nn.Parameter, full: torch.Tensor) -> None:
        """Keep this rank's part of a full_shape tensor (dummy weights: the same at any tp / ep size)."""
        inter = self.intermediate_size
        for expert in range(self.expert_start, self.expert_start + self.num_local_experts):
            if param is self.w2_weight:
                self.weight_loader(param, full[expert], expert, "down")
            else:
                self.weight_loader(param, full[expert, :inter], expert, "gate")
                self.weight_loader(param, full[expert, inter:], expert, "up")

    def local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> indices into this rank's stack; -1 for experts held elsewhere."""
        if self.ep_size == 1:
            return topk_ids
        local = topk_ids - self.expert_start
        return torch.where((local >= 0) & (local < self.num_local_experts), local, -1)

    def forward_partial(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """This rank's share of the output: its experts' pairs (and its slice of their intermediate size)."""
        ids = self.local_ids(topk_ids)
        if x.is_cuda:
            from radixserve.kernels.fused_moe import fused_moe

            return fused_moe(
                x, self.w13_weight, self.w2_weight, topk_weights, ids, activation=self.activation
            )
        from radixserve.kernels.fused_moe import fused_moe_ref

        return fused_moe_ref(
            x, self.w13_weight, self.w2_weight, topk_weights, ids, activation=self.activation
        )

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return reduce_partial_outputs(
            self.forward_partial(x, topk_weights, topk_ids), self.inter_split * self.ep_size
        )


class SparseMoeBlock(nn.Module):
    """x -> sum_j w_j * expert_j(x) over the top-k experts of the router `gate`, plus, when given,
    sigmoid(shared_expert_gate(x)) * shared_expert(x) (Qwen2-MoE)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        shared_expert: nn.Module | None = None,
        activation: str = "silu",
    ):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = ReplicatedLinear(hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, activation=activation)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            ReplicatedLinear(hidden_size, 1) if shared_expert is not None else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
