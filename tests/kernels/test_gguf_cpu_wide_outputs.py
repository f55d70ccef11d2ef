"""kernels/gguf_cpu_kernels.h on outputs wider than one staged group of weight rows (matmul_tiles writes
kStageTiles tiles' results to a buffer, then to the output rows) and on the one-row Q8_0 path (the weight
as the unsigned operand): every row of a batch, at every output column, must equal the row computed
alone, on both kernels, and the reference within the int8 activations' error."""

import numpy as np
import pytest
import torch

from radixserve.kernels import gguf_cpu
from tests.gguf_files import QUANTIZABLE, T, gguf_cpu_extension, kernel_isas, quantize

# More rows than two stage groups (2 x 64) with a ragged last group and an odd tail row; an LM-head-like
# width whose rows are 1024-float multiples apart (the case staging is for).
SHAPES = [(2 * 64 + 37, 5 * 32), (2048, 2 * 32)]


@pytest.fixture(scope="module")
def module():
    return gguf_cpu_extension()


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: T(q).name)
@pytest.mark.parametrize("n,k", SHAPES)
def test_every_column_of_a_batch_equals_the_row_alone(module, qtype, n, k):
    rng = np.random.default_rng(n + k)
    w = torch.from_numpy(np.ascontiguousarray(quantize(rng.standard_normal((n, k)) * 0.05, qtype)))
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(n)) * 2
    ref = gguf_cpu.gguf_linear_ref(x, w, int(qtype))
    for isa in kernel_isas(module):
        alone = torch.cat([module.gguf_matmul(x[i : i + 1], w, int(qtype), isa) for i in range(20)])
        assert (alone - ref).abs().max() <= 1e-2 * ref.abs().max(), isa
        for rows in (2, 5, 8, 9, 16, 20):
            got = module.gguf_matmul(x[:rows].contiguous(), w, int(qtype), isa)
            assert torch.equal(got, alone[:rows]), (isa, rows)
    if module.has_vnni():
        assert torch.equal(
            torch.cat([module.gguf_matmul(x[i : i + 1], w, int(qtype), 2) for i in range(20)]),
            torch.cat([module.gguf_matmul(x[i : i + 1], w, int(qtype), 1) for i in range(20)]),
        )
