"""The fused decode step's per-step helpers around the linears (services/executor/fast_decode.py):
gguf_cpu.gguf_logits, the LM head, must give gguf_linear(x, w, qtype).float() bit for bit (the float32
product rounded to bf16, then widened) on both kernels at every batch size, and bad inputs raise; the
C++ dequantize that gguf_cpu.dequantize takes for Q8_0 / Q4_1 / Q4_K / Q5_K / Q6_K (the embedding
lookup) must give the torch formulas' (the K-quants: gguf.quants') bits for any block bytes."""

import numpy as np
import pytest
import torch

from radixserve.kernels import gguf_cpu
from tests.gguf_files import (
    K_QUANTS,
    QUANTIZABLE,
    T,
    gguf_cpu_extension,
    kernel_isas,
    quantize,
    random_blocks,
)

# An LM-head-like width (rows 1024 floats apart, a ragged tile group) and a narrow odd one.
SHAPES = [(2048, 3 * 32), (2 * 64 + 37, 5 * 32)]


@pytest.fixture(scope="module")
def module():
    return gguf_cpu_extension()


@pytest.mark.parametrize("qtype", [*QUANTIZABLE, *K_QUANTS], ids=lambda q: T(q).name)
@pytest.mark.parametrize("n,k", SHAPES)
def test_logits_equal_the_torch_paths_bits(module, qtype, n, k):
    rng = np.random.default_rng(n + k)
    if qtype in K_QUANTS:  # whole super-blocks of 256 values
        k = k // 32 * 256
        w = torch.from_numpy(random_blocks(n, k, qtype, rng))
    else:
        w = torch.from_numpy(
            np.ascontiguousarray(quantize(rng.standard_normal((n, k)) * 0.5, qtype))
        )
    x = (torch.randn(17, k, generator=torch.Generator().manual_seed(n)) * 3).bfloat16()
    for rows in (1, 2, 5, 16, 17):
        want = gguf_cpu.gguf_linear(x[:rows], w, int(qtype)).float()
        got = gguf_cpu.gguf_logits(x[:rows], w, int(qtype))
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        assert torch.equal(got, want), rows
        # Really rounded: bf16 values (the float32 product has bits below bf16's in most columns).
        assert torch.equal(got, got.bfloat16().float())
        product = module.gguf_matmul(x[:rows].float(), w, int(qtype))
        assert not torch.equal(got, product)
        for isa in kernel_isas(module):
            assert torch.equal(module.gguf_logits(x[:rows].contiguous(), w, int(qtype), isa), want)


def test_other_types_devices_and_dtypes_take_gguf_linear(module):
    w = torch.zeros(4, 34, dtype=torch.uint8)
    assert gguf_cpu.gguf_logits(torch.ones(1, 32), w, int(T.Q8_0)) is None  # float32 rows
    assert gguf_cpu.gguf_logits(torch.ones(1, 32, dtype=torch.bfloat16), w, int(T.Q5_0)) is None


def test_bad_inputs_raise(module):
    w = torch.zeros(4, 34, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        module.gguf_logits(torch.ones(1, 32), w, int(T.Q8_0))
    with pytest.raises(RuntimeError, match="K must be a multiple of 32"):
        module.gguf_logits(torch.ones(1, 33, dtype=torch.bfloat16), w, int(T.Q8_0))
    with pytest.raises(RuntimeError, match="row bytes do not match K"):
        module.gguf_logits(torch.ones(1, 64, dtype=torch.bfloat16), w, int(T.Q8_0))
    with pytest.raises(RuntimeError, match="isa is 0"):
        module.gguf_logits(torch.ones(1, 32, dtype=torch.bfloat16), w, int(T.Q8_0), 3)


@pytest.mark.parametrize("qtype", gguf_cpu.CPP_DEQUANTIZE_TYPES)
def test_cpp_dequantize_gives_the_torch_formulas_bits(module, qtype, monkeypatch):
    # Any bytes: scales and mins that are subnormal, huge, infinite or NaN as f16 included. (The K-quants'
    # reference is gguf.quants' dequantize.)
    k = 2 * 256
    w = torch.randint(0, 256, (300, gguf_cpu.row_bytes(qtype, k)), dtype=torch.uint8)
    want = gguf_cpu.dequantize_torch(w, qtype, k)

    def no_torch_path(*args):
        raise AssertionError("the torch formulas ran")

    monkeypatch.setattr(gguf_cpu, "dequantize_torch", no_torch_path)
    got = gguf_cpu.dequantize(w, qtype, k)
    assert got.dtype == torch.float32 and got.shape == (300, k)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    # The lookup's path: a few rows picked out (not contiguous in the table).
    ids = torch.tensor([7, 0, 299, 7])
    torch.testing.assert_close(
        gguf_cpu.dequantize(w[ids], qtype, k), want[ids], rtol=0, atol=0, equal_nan=True
    )
