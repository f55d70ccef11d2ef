"""kernels/skinny_gemm.py (y = x @ W^T + b for M <= 16 rows) against torch.nn.functional.linear, and its
switch in services/executor/layers/linear.py.

Without a GPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported) on small shapes whose N and K are not multiples of the blocks (masked tail, clamped rows);
on CUDA (`-m cuda`) the Llama-3-8B decode shapes are added, through autotuning.

Tolerances: the shared helper of tests/kernels/kernel_checks.py: float32 1e-5; half types
2e-2 of max|ref| (atol) and 2e-2 (rtol): both sides accumulate in float32 in another order and round
once to the output dtype, and the interpreter rounds fp32 -> bf16 by truncation (a bf16 step, ~0.8%).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from radixserve.kernels import skinny_gemm as sg  # noqa: E402
from radixserve.executor.layers import linear as linear_mod  # noqa: E402
from tests.kernels.kernel_checks import close as elementwise_close  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.cuda


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    elementwise_close(got, ref, tol=2e-2)


def randn(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


def _check(M, N, K, dtype, with_bias, seed=0, config=None):
    g = torch.Generator().manual_seed(seed * 1000 + M * 100 + N + K)
    x = randn(g, M, K, dtype=dtype)
    w = randn(g, N, K, dtype=dtype, scale=K**-0.5)
    b = randn(g, N, dtype=dtype) if with_bias else None
    got = sg.skinny_gemm(x, w, b, config=config)
    close(got, F.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("N, K", [(48, 64), (130, 200)])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_skinny_gemm(M, N, K, with_bias, dtype):
    _check(M, N, K, dtype, with_bias)


def test_skinny_gemm_fp16_strided_x_and_leading_dims():
    g = torch.Generator().manual_seed(7)
    big = randn(g, 2, 3, 160, dtype=torch.float16)
    x = big[..., 16:144]  # [2, 3, 128], row stride 160
    w = randn(g, 40, 128, dtype=torch.float16, scale=0.1)
    got = sg.skinny_gemm(x, w)
    assert got.shape == (2, 3, 40)
    close(got, F.linear(x, w))


@pytest.mark.parametrize("M", [1, 5])
def test_skinny_gemm_gpu_block_shapes(M):
    """The block shapes autotuning picks from on the GPU (here at K = 2 * BLOCK_K + 24: loop and tail)."""
    configs = sg.GEMV_CONFIGS if M == 1 else sg.DOT_CONFIGS
    for c in {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in configs}:
        block_n, block_k = c
        _check(
            M,
            3 * block_n - 5,
            2 * block_k + 24,
            torch.bfloat16,
            with_bias=True,
            config={"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 2},
        )


def test_skinny_gemm_rejects_large_m_and_handles_empty():
    w = torch.zeros(8, 32, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError):
        sg.skinny_gemm(torch.zeros(sg.M_MAX + 1, 32, dtype=torch.bfloat16, device=DEVICE), w)
    assert sg.skinny_gemm(torch.zeros(0, 32, dtype=torch.bfloat16, device=DEVICE), w).shape == (
        0,
        8,
    )


@cuda_only
@pytest.mark.parametrize(
    "N, K", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]
)
@pytest.mark.parametrize("M", [1, 4, 8])
def test_skinny_gemm_cuda_realistic(M, N, K):
    _check(M, N, K, torch.bfloat16, with_bias=False)
    if N == 6144:
        _check(M, N, K, torch.bfloat16, with_bias=True, seed=1)


# ---------------------------------------------------------------- the switch in LinearBase._linear


def _layer(dtype, in_features=64, out_features=48, bias=True):
    g = torch.Generator().manual_seed(3)
    layer = linear_mod.ReplicatedLinear(in_features, out_features, bias=bias).to(DEVICE, dtype)
    layer.weight.data.copy_(randn(g, out_features, in_features, dtype=dtype, scale=0.1))
    layer.bias.data.copy_(randn(g, out_features, dtype=dtype))
    return layer, g


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = sg.skinny_gemm

    def wrapped(x, w, b=None, **kw):
        calls.append(tuple(x.shape))
        return real(x, w, b, **kw)

    monkeypatch.setattr(sg, "skinny_gemm", wrapped)
    return calls


def test_switch_on_by_default_and_cpu_untouched(monkeypatch, spy):
    if "RADIXSERVE_SKINNY_GEMM" not in os.environ:
        assert linear_mod.SKINNY_GEMM is True  # on unless RADIXSERVE_SKINNY_GEMM=0
    monkeypatch.setattr(linear_mod, "SKINNY_GEMM", True)
    layer, g = _layer(torch.bfloat16)
    layer.cpu()
    x = randn(g, 2, 64, dtype=torch.bfloat16).cpu()
    y = layer(x)
    assert spy == []  # on CPU the switch does nothing: F.linear / oneDNN as before
    close(y, F.linear(x, layer.weight, layer.bias))


def test_switch_routes_small_m_to_skinny_gemm(monkeypatch, spy):
    """With the device type let through (CPU here, under the interpreter), rows <= M_MAX go to the kernel."""
    monkeypatch.setattr(linear_mod, "SKINNY_GEMM", True)
    monkeypatch.setattr(linear_mod, "SKINNY_DEVICES", ("cuda", DEVICE))
    layer, g = _layer(torch.bfloat16)
    x = randn(g, 2, 3, 64, dtype=torch.bfloat16)  # 6 rows, leading dims flattened
    close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert spy == [(2, 3, 64)]
    big = randn(g, sg.M_MAX + 1, 64, dtype=torch.bfloat16)
    close(layer(big), F.linear(big, layer.weight, layer.bias))
    assert len(spy) == 1  # more rows than M_MAX: F.linear
    f32, _ = _layer(torch.float32)
    f32(randn(g, 2, 64, dtype=torch.float32))
    assert len(spy) == 1  # float32 weights: F.linear
    monkeypatch.setattr(linear_mod, "SKINNY_GEMM", False)
    layer(x)
    assert len(spy) == 1  # switch off
