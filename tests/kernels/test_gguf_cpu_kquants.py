"""The K-quant row kernels (Q4_K, Q5_K, Q6_K in kernels/gguf_cpu_kernels.h: a 256-value super-block run
as 8 blocks of 32 with its sub-block scales, activations quantized to int8 per 32 values as for the other
types) against the reference (gguf.quants.dequantize, then a float32 matmul), on 1 to 17 activation rows,
odd output counts and K of 1, 3 and 5 super-blocks; the AVX2 and AVX-512 VNNI kernels give the same bits,
and a row's result does not depend on its batch."""

import gguf
import numpy as np
import pytest
import torch

from radixserve.kernels import gguf_cpu
from tests.gguf_files import K_QUANTS, T, gguf_cpu_extension, kernel_isas, random_blocks

# (N, K): an odd N (2-row tiles and a 1-row tail) with a partial 16-block chunk of mins (5 x 8 blocks),
# a single super-block and a single output row, and more rows than one staged group (2 x 32 tiles).
SHAPES = [(37, 5 * 256), (5, 256), (1, 3 * 256), (131, 3 * 256)]
ROWS = list(range(1, 18))


@pytest.fixture(scope="module")
def module():
    return gguf_cpu_extension()


def full_range_blocks(n: int, k: int, qtype: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks whose f16 scales (d, and dmin for Q4_K / Q5_K) take either sign and magnitudes
    from 1e-4 to 1 (finite): random_blocks' bytes with other scales."""
    blocks = random_blocks(n, k, qtype, rng).reshape(n, k // 256, -1)
    offsets = (208,) if qtype == T.Q6_K else (0, 2)
    for off in offsets:
        mag = 10.0 ** rng.uniform(-4, 0, size=(n, k // 256))
        halves = (mag * rng.choice([-1.0, 1.0], size=mag.shape)).astype(np.float16)
        blocks[..., off : off + 2] = halves.view(np.uint8).reshape(n, k // 256, 2)
    return blocks.reshape(n, -1)


def reference(x: torch.Tensor, w: torch.Tensor, qtype: int) -> torch.Tensor:
    return x.double() @ dequantized(w, qtype).T


def dequantized(w: torch.Tensor, qtype: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(w.numpy(), T(qtype)).astype(np.float64))


def int8_error_bound(x: torch.Tensor, w: torch.Tensor, qtype: int) -> torch.Tensor:
    """[rows, N]: what quantizing x to int8 per 32 values can change an output. Each value moves by at
    most half its block's step, max|x_block| / 254, so |error| <= sum_i |w_i| max|x_block(i)| / 254; plus
    float32 rounding of the sums (1e-5 of sum |w_i x_i|)."""
    step = x.double().abs().reshape(x.shape[0], -1, 32).amax(-1).repeat_interleave(32, -1) / 254
    aw = dequantized(w, qtype).abs()
    return step @ aw.T + 1e-5 * (x.double().abs() @ aw.T)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: T(q).name)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("blocks", ["small", "full-range"])
def test_kernels_match_the_dequantizing_reference(module, qtype, n, k, blocks):
    rng = np.random.default_rng(n + k + int(qtype))
    make = random_blocks if blocks == "small" else full_range_blocks
    w = torch.from_numpy(make(n, k, qtype, rng))
    assert w.shape == (n, gguf_cpu.row_bytes(qtype, k))
    x = torch.randn(max(ROWS), k, generator=torch.Generator().manual_seed(k)) * 2
    ref, bound = reference(x, w, qtype), int8_error_bound(x, w, qtype)
    for isa in kernel_isas(module):
        for rows in ROWS:
            got = module.gguf_matmul(x[:rows].contiguous(), w, int(qtype), isa)
            assert got.shape == (rows, n)
            err = (got.double() - ref[:rows]).abs()
            assert (err <= bound[:rows]).all(), (isa, rows, (err / bound[:rows]).max().item())
            if n > 1:  # and, as stated for Q4_0 / Q4_1 / Q8_0: within 1% of the largest output
                assert err.max().item() <= 1e-2 * ref[:rows].abs().max().item(), (isa, rows)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: T(q).name)
def test_exact_for_activations_int8_represents(module, qtype):
    """Integer activations whose every 32-block holds a +-127 quantize without error: each kernel then
    equals the reference up to float32 summation order (any misplaced value, scale or min shows)."""
    n, k = 37, 5 * 256
    w = torch.from_numpy(full_range_blocks(n, k, qtype, np.random.default_rng(7)))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-127, 128, (17, k), generator=g).float()
    x[:, ::32] = 127.0
    ref = reference(x, w, qtype)
    scale = (x.abs().double() @ dequantized(w, qtype).abs().T).max().item()
    for isa in kernel_isas(module):
        for rows in (1, 2, 9, 17):
            got = module.gguf_matmul(x[:rows].contiguous(), w, int(qtype), isa)
            assert (got.double() - ref[:rows]).abs().max().item() <= 1e-6 * scale, (isa, rows)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: T(q).name)
@pytest.mark.parametrize("n,k", SHAPES[:2])
def test_a_row_alone_equals_it_in_every_batch_and_on_both_kernels(module, qtype, n, k):
    w = torch.from_numpy(full_range_blocks(n, k, qtype, np.random.default_rng(n)))
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(n + k)) * 3
    alone = {
        isa: torch.cat([module.gguf_matmul(x[i : i + 1], w, int(qtype), isa) for i in range(17)])
        for isa in kernel_isas(module)
    }
    for isa in kernel_isas(module):
        assert torch.equal(alone[isa], alone[1]), isa  # VNNI == AVX2, bit for bit
        for rows in ROWS:
            for start in {0, 17 - rows}:
                got = module.gguf_matmul(x[start : start + rows].contiguous(), w, int(qtype), isa)
                assert torch.equal(got, alone[isa][start : start + rows]), (isa, rows, start)
    # gguf_linear (the executor's call) takes these kernels: the same bits.
    assert torch.equal(gguf_cpu.gguf_linear(x, w, int(qtype)), alone[1])


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: T(q).name)
def test_cpp_dequantize_is_the_gguf_packages_bit_for_bit(module, qtype):
    w = torch.from_numpy(full_range_blocks(9, 3 * 256, qtype, np.random.default_rng(3)))
    want = torch.from_numpy(gguf.quants.dequantize(w.numpy(), T(qtype)).astype(np.float32))
    assert torch.equal(module.gguf_dequantize(w, int(qtype), 3 * 256), want)
    assert torch.equal(gguf_cpu.dequantize(w[[4, 0, 4]], int(qtype), 3 * 256), want[[4, 0, 4]])


def test_k_not_a_multiple_of_256_is_refused(module):
    w = torch.zeros(4, 144, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="K must be a multiple of 256"):
        module.gguf_matmul(torch.ones(1, 288), w, int(T.Q4_K))
    with pytest.raises(RuntimeError, match="row bytes do not match K"):
        module.gguf_matmul(torch.ones(1, 512), w, int(T.Q4_K))
