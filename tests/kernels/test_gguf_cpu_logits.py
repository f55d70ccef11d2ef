"""gguf_cpu.gguf_logits, the fused decode step's LM head (services/executor/fast_decode.py): float32
logits of bf16 rows in one call must be gguf_linear(x, w, qtype).float() bit for bit (the float32
product rounded to bf16, then widened), on both kernels, at every batch size; bad inputs raise."""

import numpy as np
import pytest
import torch

from radixserve.kernels import gguf_cpu
from tests.gguf_files import QUANTIZABLE, T, quantize

# An LM-head-like width (rows 1024 floats apart, a ragged tile group) and a narrow odd one.
SHAPES = [(2048, 3 * 32), (2 * 64 + 37, 5 * 32)]


@pytest.fixture(scope="module")
def module():
    m = gguf_cpu.load()
    if m is None:
        pytest.skip("the GGUF CPU extension is unavailable on this machine")
    return m


def isas(module):
    return [1, 2] if module.has_vnni() else [1]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: T(q).name)
@pytest.mark.parametrize("n,k", SHAPES)
def test_logits_equal_the_torch_paths_bits(module, qtype, n, k):
    rng = np.random.default_rng(n + k)
    w = torch.from_numpy(np.ascontiguousarray(quantize(rng.standard_normal((n, k)) * 0.5, qtype)))
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
        for isa in isas(module):
            assert torch.equal(module.gguf_logits(x[:rows].contiguous(), w, int(qtype), isa), want)


def test_other_types_devices_and_dtypes_take_gguf_linear(module):
    w = torch.zeros(4, 34, dtype=torch.uint8)
    assert gguf_cpu.gguf_logits(torch.ones(1, 32), w, int(T.Q8_0)) is None  # float32 rows
    assert gguf_cpu.gguf_logits(torch.ones(1, 32, dtype=torch.bfloat16), w, int(T.Q6_K)) is None


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
