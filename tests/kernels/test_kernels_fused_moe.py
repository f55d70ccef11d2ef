"""kernels/fused_moe.py (block alignment of routed pairs, grouped Triton GEMMs) against its torch
reference, a loop over experts.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1) at small shapes; on CUDA,
realistic Mixtral-8x7B and Qwen3-30B-A3B shapes are added. Routing is skewed on purpose: one expert
gets most pairs, one gets none, and some pairs name an expert held by another rank (id -1).

Tolerances: float32 1e-5 (atol and rtol; the GEMMs run in IEEE fp32). bfloat16: atol and rtol
2e-2 * max|ref| and 2e-2: gate_up and act are stored in bf16 by both sides, so a rounding difference
there (the interpreter rounds fp32 -> bf16 by truncation, torch to nearest) reaches the output
through the down projection, a couple of bf16 steps of the largest value.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.kernels.fused_moe import fused_moe, fused_moe_ref, moe_align_block_size  # noqa: E402
from tests.kernels.kernel_checks import close as elementwise_close  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.cuda


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    elementwise_close(got, ref, tol=2e-2)  # bf16 in the interpreter truncates: ~1.3% off


def routing(T, E, k, seed, hot=0, empty=None, foreign=0.0):
    """(weights [T, k] float32, ids [T, k] int64): softmax top-k of random logits, expert `hot` favoured,
    expert `empty` never chosen, a fraction `foreign` of the pairs set to -1 (another rank's expert)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    logits[:, hot] += 1.5
    if empty is not None:
        logits[:, empty] = float("-inf")
    weights, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    if foreign:
        ids[torch.rand(T, k, generator=g) < foreign] = -1
    return weights.to(DEVICE), ids.to(DEVICE)


def make_case(T, E, H, I, k, dtype, seed, **route):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(DEVICE, dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(DEVICE, dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I**-0.5).to(DEVICE, dtype)
    return (x, w13, w2, *routing(T, E, k, seed, **route))


def test_align_groups_pairs_by_expert_in_padded_blocks():
    T, E, k, block_m = 9, 5, 2, 4
    _, ids = routing(T, E, k, seed=1, hot=0, empty=3, foreign=0.2)
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, E, block_m)
    sorted_ids, expert_ids, used = sorted_ids.cpu(), expert_ids.cpu(), int(num_padded.item())
    flat = ids.reshape(-1).cpu()
    counts = torch.bincount(flat[flat >= 0], minlength=E)
    assert counts[3] == 0 and counts[0] == counts.max() and (flat < 0).any()
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert sorted_ids.numel() % block_m == 0 and expert_ids.numel() == sorted_ids.numel() // block_m
    real = sorted_ids[sorted_ids < T * k]
    assert (
        sorted(real.tolist()) == torch.nonzero(flat >= 0).flatten().tolist()
    )  # each held pair once
    assert (sorted_ids[used:] == T * k).all() and (expert_ids[used // block_m :] == E).all()
    for b in range(used // block_m):
        pairs = sorted_ids[b * block_m : (b + 1) * block_m]
        pairs = pairs[pairs < T * k]
        assert len(pairs) > 0 and (flat[pairs] == expert_ids[b]).all()
    assert 3 not in expert_ids[: used // block_m].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "T, E, H, I, k, block_m, foreign",
    [
        (1, 4, 64, 32, 2, None, 0.0),  # one decode token
        (13, 8, 64, 96, 2, 16, 0.0),  # skewed loads, an empty expert, N tail (2I = 192)
        (40, 8, 96, 48, 2, 32, 0.0),  # K tail (H = 96 over BLOCK_K 64), larger blocks
        (21, 6, 64, 32, 2, 16, 0.3),  # expert parallel: some pairs held by another rank
    ],
)
def test_fused_moe_matches_reference(T, E, H, I, k, block_m, foreign, dtype):
    x, w13, w2, weights, ids = make_case(
        T, E, H, I, k, dtype, seed=T, hot=1, empty=E - 1, foreign=foreign
    )
    close(
        fused_moe(x, w13, w2, weights, ids, block_m=block_m),
        fused_moe_ref(x, w13, w2, weights, ids),
    )


def test_pairs_of_other_ranks_contribute_nothing():
    x, w13, w2, weights, ids = make_case(5, 4, 64, 32, 2, torch.float32, seed=3)
    ids[:, 1] = -1
    got = fused_moe(x, w13, w2, weights, ids)
    close(got, fused_moe(x, w13, w2, weights[:, :1].contiguous(), ids[:, :1].contiguous()))
    ids[:] = -1
    assert torch.equal(fused_moe(x, w13, w2, weights, ids), torch.zeros_like(x))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_fused_moe_cuda_mixtral_shapes(T, dtype):
    x, w13, w2, weights, ids = make_case(T, 8, 4096, 14336, 2, dtype, seed=T)
    close(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 16, 512])
def test_fused_moe_cuda_qwen3_moe_shapes(T, dtype):
    x, w13, w2, weights, ids = make_case(T, 128, 2048, 768, 8, dtype, seed=T, hot=5, empty=7)
    close(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids))
