"""kernels/lora.py (batched multi-LoRA shrink / expand over per-token adapter slots) against its torch
reference (lora_reference) and against a per-token loop of plain matmuls.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1). Tolerances: the
kernels accumulate in float32 as the reference does: 1e-5 relative for float32 inputs; for bf16 / fp16
outputs (y is rounded once to its dtype at the store) the shared kernel_checks tolerance, 2e-2.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.kernels import lora  # noqa: E402
from tests.kernels.kernel_checks import DEVICE, close, gen, randn  # noqa: E402


def _inputs(T, K, N, R, S, dtype, seed=0):
    g = gen(seed)
    x = randn(g, T, K, dtype=dtype)
    a = randn(g, S, R, K, dtype=dtype, scale=K**-0.5)
    b = randn(g, S, N, R, dtype=dtype, scale=R**-0.5)
    scales = torch.rand(S, generator=g).to(DEVICE) + 0.5
    # short batches: every slot and the base model (-1) mixed in one tile of 16 tokens (decode); long ones:
    # runs of one slot as prefills give (uniform tiles of an adapter and of the base model, a tile
    # mixing two requests, a last partial tile)
    if T < 48:
        slots = ([-1, 0, 0, S - 1, -1] + list(range(S)) * 16)[:T]
    else:
        slots = [S - 1] * 16 + [-1] * 16 + [0] * 5 + [S - 1] * (T - 37)
    slots = torch.tensor(slots, device=DEVICE)
    return x, a, b, scales, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "T, K, N, R, S",
    [
        (1, 32, 48, 8, 1),
        (9, 100, 130, 24, 3),
        (17, 64, 96, 192, 4),
        (40, 64, 80, 16, 3),  # a program per tile, looping over mixed tiles' runs
        (57, 72, 80, 16, 2),
        (300, 200, 150, 48, 3),  # a prefill-sized step: 64-token tiles (lora.LARGE)
        (280, 64, 70, 192, 2),  # the same above a stacked rank of 64: 32-token expand tiles
    ],
)
def test_shrink_expand_match_reference(T, K, N, R, S, dtype):
    x, a, b, scales, slots = _inputs(T, K, N, R, S, dtype)
    y0 = randn(gen(1), T, N, dtype=dtype)
    s = lora.lora_shrink(x, a, slots)
    y = lora.lora_expand(y0.clone(), s, b, scales, slots)
    ref = (y0.float() + lora.lora_reference(x, a, b, scales, slots)).to(dtype)
    close(y, ref)
    # base-model tokens: untouched, bit for bit; their shrink rows are zeros
    base = slots < 0
    assert torch.equal(y[base], y0[base])
    assert torch.equal(s[base], torch.zeros_like(s[base]))


@pytest.mark.parametrize("launch", [lora.FEW, lora.MANY, lora.LARGE], ids=["few", "many", "large"])
def test_every_launch_class_gives_the_reference(launch):
    """Any launch on any step size computes the same delta: mixed tiles of every slot and the base model
    (a decode batch) and runs of one slot across tile edges (prefills), K over several chunks."""
    for T in (9, 70):
        x, a, b, scales, slots = _inputs(T, 1100, 140, 24, 4, torch.float32, seed=T)
        y0 = randn(gen(3), T, 140, dtype=torch.float32)
        s = lora.lora_shrink(x, a, slots, launch)
        y = lora.lora_expand(y0.clone(), s, b, scales, slots, launch)
        close(y, y0 + lora.lora_reference(x, a, b, scales, slots))
        assert torch.equal(y[slots < 0], y0[slots < 0])


def test_launch_classes_by_step_size():
    assert lora.launch_for(1) == lora.launch_for(lora.FEW_TOKENS) == lora.FEW
    assert lora.launch_for(lora.FEW_TOKENS + 1) == lora.launch_for(lora.MANY_TOKENS) == lora.MANY
    assert lora.launch_for(lora.MANY_TOKENS + 1) == lora.launch_for(8192) == lora.LARGE


def test_reference_is_a_per_token_matmul():
    x, a, b, scales, slots = _inputs(6, 16, 20, 4, 2, torch.float64)
    delta = lora.lora_reference(x, a, b, scales, slots)
    for t, slot in enumerate(slots.tolist()):
        want = (
            torch.zeros(20, dtype=torch.float64)
            if slot < 0
            else scales[slot] * (b[slot] @ (a[slot] @ x[t]))
        )
        torch.testing.assert_close(
            delta[t].double(), want.double().to(delta.device), rtol=1e-5, atol=1e-5
        )


def test_strided_rows_and_int32_slots():
    x, a, b, scales, slots = _inputs(5, 32, 40, 8, 2, torch.float32)
    wide = torch.zeros(5, 64, device=DEVICE)
    wide[:, :40] = 1.0
    view = wide[:, :40]  # row stride 64
    lora.lora_expand(view, lora.lora_shrink(x, a, slots.int()), b, scales, slots.int())
    close(view.contiguous(), 1.0 + lora.lora_reference(x, a, b, scales, slots))
    assert torch.equal(wide[:, 40:], torch.zeros(5, 24, device=DEVICE))


def test_a_tokens_result_does_not_depend_on_its_tile_mates():
    """Each run of a tile is one masked tile GEMM: a token's row is the same bits alone, beside tokens
    of other adapters (a mixed decode tile) and inside a run of its own adapter (a uniform tile)."""
    # K = 64: one K chunk, so each s element gets one atomic add (a fixed order on a GPU too)
    x, a, b, scales, _ = _inputs(16, 64, 48, 16, 3, torch.bfloat16)
    y0 = randn(gen(2), 16, 48, dtype=torch.bfloat16)

    def delta(slots):
        slots = torch.tensor(slots, device=DEVICE)
        return lora.lora_expand(y0.clone(), lora.lora_shrink(x, a, slots), b, scales, slots)

    mixed = delta([0, 1, 2, -1, 1, 1, 0, 2, 2, 2, -1, 0, 1, 2, 0, 1])
    uniform = delta([1] * 16)
    for t in (1, 4, 5, 12, 15):  # the tokens of adapter 1
        alone = delta([-1] * t + [1] + [-1] * (15 - t))
        assert torch.equal(mixed[t], alone[t]) and torch.equal(uniform[t], alone[t]), t


def test_rank_above_the_limit_is_refused():
    x, a, b, scales, slots = _inputs(2, 16, 16, lora.MAX_STACKED_RANK + 1, 1, torch.float32)
    with pytest.raises(AssertionError):
        lora.lora_shrink(x, a, slots)


# Llama-3-8B's LoRA shapes at rank 64 (qkv: K 4096, N 6144, R 3 x 64; down: K 14336, N 4096, R 64), decode
# and prefill token counts: run on a GPU with `-m cuda` (not on the CPU: the interpreter is too slow).
@pytest.mark.cuda
@pytest.mark.parametrize("K, N, R", [(4096, 6144, 192), (14336, 4096, 64), (4096, 28672, 128)])
@pytest.mark.parametrize("T", [1, 16, 100, 512])
def test_llama8b_shapes_on_cuda(T, K, N, R):
    x, a, b, scales, slots = _inputs(T, K, N, R, 8, torch.bfloat16)
    y0 = randn(gen(2), T, N, dtype=torch.bfloat16)
    y = lora.lora_expand(y0.clone(), lora.lora_shrink(x, a, slots), b, scales, slots)
    close(y, (y0.float() + lora.lora_reference(x, a, b, scales, slots)).to(torch.bfloat16))
