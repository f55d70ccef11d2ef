"""How services/executor/layers/moe.py splits a MoE layer over ranks, on one process: the "ranks" are
FusedMoE layers built one after the other (expert parallelism by ep_rank / ep_size; tensor parallelism
by patching the layer module's tp_rank / tp_size), each loaded from the same checkpoint tensors. The
sum of their partial outputs (what the all-reduce of reduce_partial_outputs gives a real group) must
equal the single-rank output."""

import pytest
import torch

from radixserve.executor.layers import moe
from radixserve.executor.layers.moe import FusedMoE, reduce_partial_outputs, select_experts
from radixserve.executor.weights import init_dummy_weights

E, H, I, TOP_K, T = 8, 32, 48, 2, 11


def expert_checkpoint(seed=0):
    """{(expert, shard): tensor} as a checkpoint holds them: gate/up [I, H], down [H, I]."""
    g = torch.Generator().manual_seed(seed)
    return {
        (e, s): torch.randn(*((H, I) if s == "down" else (I, H)), generator=g) * 0.2
        for e in range(E)
        for s in ("gate", "up", "down")
    }


def load(layer: FusedMoE, checkpoint) -> list[int]:
    """Feeds every expert tensor to the layer; returns the experts it kept."""
    kept = set()
    for (expert, shard), tensor in checkpoint.items():
        param = layer.w2_weight if shard == "down" else layer.w13_weight
        if param.weight_loader(param, tensor, expert, shard):
            kept.add(expert)
    return sorted(kept)


def routed(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    weights, ids = select_experts(torch.randn(T, E, generator=g), TOP_K, renormalize=True)
    return x, weights, ids


def full_layer_output(x, weights, ids):
    layer = FusedMoE(E, H, I)
    assert load(layer, expert_checkpoint()) == list(range(E))
    return layer(x, weights, ids)


@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_slices_sum_to_the_full_layer(ep_size):
    x, weights, ids = routed()
    partials = []
    for rank in range(ep_size):
        layer = FusedMoE(E, H, I, ep_rank=rank, ep_size=ep_size)
        per_rank = E // ep_size
        assert layer.w13_weight.shape == (per_rank, 2 * I, H) and layer.w2_weight.shape == (
            per_rank,
            H,
            I,
        )
        assert load(layer, expert_checkpoint()) == list(
            range(rank * per_rank, (rank + 1) * per_rank)
        )
        part = layer.forward_partial(x, weights, ids)
        mine = (ids >= rank * per_rank) & (ids < (rank + 1) * per_rank)
        assert torch.all(part[~mine.any(dim=1)] == 0)  # tokens routed to no expert of this rank
        partials.append(part)
    assert all(p.abs().sum() > 0 for p in partials)
    torch.testing.assert_close(
        torch.stack(partials).sum(0), full_layer_output(x, weights, ids), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("tp_size, ep_size", [(2, 1), (4, 2)])
def test_tensor_parallel_ranks_split_the_intermediate_size(monkeypatch, tp_size, ep_size):
    x, weights, ids = routed()
    expected = full_layer_output(x, weights, ids)
    partials = []
    for rank in range(tp_size):
        monkeypatch.setattr(moe, "tp_rank", lambda: rank)
        monkeypatch.setattr(moe, "tp_size", lambda: tp_size)
        group = tp_size // ep_size  # ranks sharing one slice of experts
        layer = FusedMoE(E, H, I, ep_rank=rank // group, ep_size=ep_size)
        assert layer.w2_weight.shape == (E // ep_size, H, I // group)
        load(layer, expert_checkpoint())
        partials.append(layer.forward_partial(x, weights, ids))
    torch.testing.assert_close(torch.stack(partials).sum(0), expected, atol=1e-5, rtol=1e-5)


def test_stacked_weights_follow_the_checkpoint_layout():
    checkpoint = expert_checkpoint()
    layer = FusedMoE(E, H, I, ep_rank=1, ep_size=2)
    load(layer, checkpoint)
    assert torch.equal(layer.w13_weight[0, :I], checkpoint[(4, "gate")])
    assert torch.equal(layer.w13_weight[0, I:], checkpoint[(4, "up")])
    assert torch.equal(layer.w2_weight[3], checkpoint[(7, "down")])


def test_dummy_weights_are_the_same_slices_at_any_split():
    whole, half = FusedMoE(E, H, I), FusedMoE(E, H, I, ep_rank=1, ep_size=2)
    init_dummy_weights(whole, seed=3)
    init_dummy_weights(half, seed=3)
    assert torch.equal(half.w13_weight, whole.w13_weight[E // 2 :])
    assert torch.equal(half.w2_weight, whole.w2_weight[E // 2 :])


def test_reduce_is_identity_on_one_rank():
    x = torch.randn(3, H)
    assert reduce_partial_outputs(x, 1) is x
