"""kernels/gguf_cpu.cpp's row kernels, bit for bit: a row's result must not depend on how many rows
share its call (a speculative verify step runs K + 1 rows of one request where a decode step runs one,
and NGRAM's greedy outputs must equal plain decoding's), nor on which kernel ran it (AVX-512 VNNI or
AVX2: the same CPU-independent sums)."""

import numpy as np
import pytest
import torch

from radixserve.kernels import gguf_cpu
from tests.gguf_files import QUANTIZABLE, T, gguf_cpu_extension, kernel_isas, quantize

# 37 weight rows: 2-row tiles and a 1-row tail; 17 blocks per row: a zero-padded last block pair and a
# partial 16-block chunk.
SHAPES = [(37, 17 * 32), (64, 16 * 32), (5, 32)]


@pytest.fixture(scope="module")
def module():
    return gguf_cpu_extension()


def weight(n, k, qtype, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(
        np.ascontiguousarray(quantize(rng.standard_normal((n, k)) * 0.05, qtype))
    )


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: T(q).name)
@pytest.mark.parametrize("n,k", SHAPES)
def test_a_row_alone_equals_it_in_every_batch_of_2_to_16(module, qtype, n, k):
    w = weight(n, k, qtype)
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(n + k))
    for isa in kernel_isas(module):
        alone = torch.stack(
            [module.gguf_matmul(x[i : i + 1], w, int(qtype), isa)[0] for i in range(16)]
        )
        for size in range(2, 17):
            for start in {0, 16 - size, (16 - size) // 2}:
                got = module.gguf_matmul(x[start : start + size].contiguous(), w, int(qtype), isa)
                assert torch.equal(got, alone[start : start + size]), (isa, size, start)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: T(q).name)
@pytest.mark.parametrize("n,k", SHAPES)
def test_the_vnni_and_avx2_kernels_give_the_same_bits(module, qtype, n, k):
    if not module.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI: only the AVX2 kernel runs")
    w = weight(n, k, qtype, seed=1)
    for rows in (1, 2, 3, 5, 8, 9, 16, 40):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3
        avx2 = module.gguf_matmul(x, w, int(qtype), 1)
        assert torch.equal(module.gguf_matmul(x, w, int(qtype), 2), avx2), rows
        assert torch.equal(module.gguf_matmul(x, w, int(qtype)), avx2), rows  # the default path
        # and both are the computation the reference describes (int8 activations: ~0.5%)
        ref = gguf_cpu.gguf_linear_ref(x, w, int(qtype))
        assert (avx2 - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_zero_rows_and_all_zero_activations(module):
    w = weight(37, 17 * 32, T.Q4_1)
    assert module.gguf_matmul(torch.empty(0, 17 * 32), w, int(T.Q4_1)).shape == (0, 37)
    for isa in kernel_isas(module):
        y = module.gguf_matmul(torch.zeros(3, 17 * 32), w, int(T.Q4_1), isa)
        assert torch.equal(y, torch.zeros(3, 37))


def test_an_unknown_or_unavailable_kernel_is_refused(module):
    w = weight(5, 32, T.Q8_0)
    with pytest.raises(RuntimeError, match="isa"):
        module.gguf_matmul(torch.ones(1, 32), w, int(T.Q8_0), 3)
    if not module.has_vnni():
        with pytest.raises(RuntimeError, match="VNNI"):
            module.gguf_matmul(torch.ones(1, 32), w, int(T.Q8_0), 2)
