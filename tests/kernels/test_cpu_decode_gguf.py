"""The fused CPU decode kernels' GGUF linears (kernels/cpu_decode.cpp's qgemm_part, through its
standalone `gguf_gemm`): bf16 activations @ W^T for W in a GGUF file's blocks, bit for bit what the torch
path's gguf_linear (kernels/gguf_cpu.py) returns for the same bf16 input, whatever the thread count and
the batch; other block types and malformed weights are refused with a clear error."""

import numpy as np
import pytest
import torch

from radixserve.kernels import cpu_decode, gguf_cpu
from tests.gguf_files import K_QUANTS, T, quantize, random_blocks

FUSED = [T.Q4_0, T.Q4_1, T.Q8_0, *K_QUANTS]
# (rows, K): 2-row tiles with a 1-row tail, a zero-padded last block pair, a partial 16-block chunk;
# and the embedded SmolLM2's qkv, gate_up and down shapes.
SHAPES = [(37, 17 * 32), (5, 32), (960, 576), (3072, 576), (576, 1536)]
# The K-quants' super-blocks of 256: a partial 16-block chunk (5 x 8 blocks of 32), one super-block, and
# SmolLM2's down shape (its other K, 576, is no multiple of 256).
K_SHAPES = [(37, 5 * 256), (5, 256), (576, 1536)]
CASES = [(q, n, k) for q in FUSED for n, k in (K_SHAPES if q in K_QUANTS else SHAPES)]


@pytest.fixture(scope="module")
def module():
    if not cpu_decode.cpu_has_avx512_bf16() or gguf_cpu.load() is None:
        pytest.skip("the fused CPU decode and GGUF CPU kernels need AVX512-BF16")
    m = cpu_decode.load()
    if m is None:
        pytest.skip("the CPU decode extension is unavailable on this machine")
    return m


def weight(n, k, qtype, seed=0):
    rng = np.random.default_rng(seed)
    if qtype in K_QUANTS:  # random valid blocks (the gguf package cannot quantize to K-quants)
        return torch.from_numpy(random_blocks(n, k, qtype, rng))
    return torch.from_numpy(
        np.ascontiguousarray(quantize(rng.standard_normal((n, k)) * 0.05, qtype))
    )


@pytest.mark.parametrize("qtype,n,k", CASES, ids=lambda v: T(v).name if isinstance(v, T) else None)
@pytest.mark.parametrize("m", [1, 3, 9, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_torch_paths_gguf_linear_bit_for_bit(module, qtype, n, k, m, with_bias):
    g = torch.Generator().manual_seed(n + k + m)
    w = weight(n, k, qtype)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    bias = torch.randn(n, generator=g) if with_bias else None
    got = module.gguf_gemm(x, w, int(qtype), bias)
    ref = gguf_cpu.gguf_linear(x, w, int(qtype), bias)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert torch.equal(got, ref)
    # ... and not by accident: the result is the dequantized product up to the int8 activations' error.
    exact = x.float() @ gguf_cpu.dequantize(w, int(qtype), k).T + (0 if bias is None else bias)
    assert (got.float() - exact).abs().max() <= 0.05 * exact.abs().max()


@pytest.mark.parametrize("qtype", gguf_cpu.PACKABLE_TYPES, ids=lambda q: T(q).name)
@pytest.mark.parametrize("m", [1, 5, 16])
def test_packed_rows_equal_the_torch_paths_gguf_linear_bit_for_bit(module, qtype, m):
    """The rows a CPU model loads packed (gguf_cpu.pack), in threads' shares of whole 16-row groups."""
    n, k = (576, 1536) if qtype in K_QUANTS else (960, 576)
    w = gguf_cpu.pack_rows(weight(n, k, qtype, seed=m), qtype)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).to(torch.bfloat16)
    ptype = gguf_cpu.PACKED + int(qtype)
    assert torch.equal(module.gguf_gemm(x, w, ptype, None), gguf_cpu.gguf_linear(x, w, ptype))


@pytest.mark.parametrize("qtype", FUSED, ids=lambda q: T(q).name)
def test_a_row_does_not_depend_on_batch_mates_or_threads(module, qtype):
    n, k = 37, 5 * 256 if qtype in K_QUANTS else 17 * 32
    w = weight(n, k, qtype, seed=1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, k, generator=g).to(torch.bfloat16)
    alone = torch.cat([module.gguf_gemm(x[i : i + 1], w, int(qtype)) for i in range(16)])
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, 2, threads}):
            torch.set_num_threads(t)
            for m in (2, 5, 8, 9, 16):
                assert torch.equal(module.gguf_gemm(x[:m], w, int(qtype)), alone[:m]), (t, m)
    finally:
        torch.set_num_threads(threads)


def test_other_block_types_and_bad_weights_are_refused(module):
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    w = weight(8, 64, T.Q4_1)
    with pytest.raises(RuntimeError, match="block type 6 has no kernel"):
        module.gguf_gemm(x, w, int(T.Q5_0))
    with pytest.raises(RuntimeError, match="K must be a multiple of 256"):
        module.gguf_gemm(x, w, int(T.Q4_K))
    with pytest.raises(RuntimeError, match=r"expected \[8, 210\] GGUF blocks"):
        module.gguf_gemm(torch.zeros(1, 256, dtype=torch.bfloat16), w, int(T.Q6_K))
    with pytest.raises(RuntimeError, match=r"expected \[8, 40\] GGUF blocks"):
        module.gguf_gemm(x, weight(8, 64, T.Q8_0), int(T.Q4_1))
    with pytest.raises(RuntimeError, match="K must be a multiple of 32"):
        module.gguf_gemm(torch.zeros(1, 48, dtype=torch.bfloat16), w, int(T.Q4_1))
    with pytest.raises(RuntimeError, match="uint8"):
        module.gguf_gemm(x, w.float(), int(T.Q4_1))
