"""kernels/fp8_gemm.py against its torch references (dequantize, then matmul in float32).

Without a GPU the kernels run in the Triton interpreter on odd sizes (N, K not multiples of the blocks,
block scales over ragged edges); on CUDA (`-m cuda`) the Llama-3-8B shapes are added.

Tolerances: the skinny kernel reads exactly the reference's dequantized values (fp8 and its float32 scale),
so it differs only by float32 summation order and the final rounding: kernel_checks.close at 2e-2 of
max|ref| for bf16 out, 1e-5 for fp32. The prefill GEMM is compared with the reference on the SAME
quantized activations (same tolerances); the activation quantizer must give the reference's fp8 codes
exactly (it rounds to nearest even, like torch's cast) and the same scales.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.kernels import fp8_gemm as fg  # noqa: E402
from tests.kernels.kernel_checks import close as elementwise_close  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
cuda_only = pytest.mark.cuda


def close(got, ref):
    elementwise_close(got, ref, tol=2e-2)


def _weights(g, N, K, block):
    w = torch.randn(N, K, generator=g) * K**-0.5
    wq, s = fg.quantize_weight(w, block)
    return wq.to(DEVICE), s.to(DEVICE)


def _x(g, M, K, dtype):
    return torch.randn(M, K, generator=g).to(dtype=dtype, device=DEVICE)


def test_weight_quantization_round_trips_within_fp8_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 72, generator=g)
    for block in (None, (16, 32)):
        wq, s = fg.quantize_weight(w, block)
        assert wq.dtype == fg.FP8 and s.dtype == torch.float32
        assert s.shape == ((40,) if block is None else (3, 3))
        back = fg.dequantize_weight(wq, s, block, torch.float32)
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each value (plus subnormal steps)
        assert ((back - w).abs() <= w.abs() / 16 + s.max() * 2**-9).all()


@pytest.mark.parametrize("block", [None, (16, 32), (16, 16)])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_activation_quantization_matches_reference(M, block):
    g = torch.Generator().manual_seed(M)
    x = _x(g, M, 72, torch.bfloat16) * 5
    group = None if block is None else block[1]
    q, s = fg.quantize_activations(x, group)
    rq, rs = fg.quantize_activations_ref(x.cpu(), group)
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-6, atol=0)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))


def test_static_activation_scale():
    g = torch.Generator().manual_seed(5)
    x = _x(g, 5, 40, torch.bfloat16)
    scale = torch.tensor(0.01, device=DEVICE)
    q, s = fg.quantize_activations(x, static_scale=scale)
    rq, rs = fg.quantize_activations_ref(x.cpu(), static_scale=scale.cpu())
    assert s.shape == (5,) and torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize(
    "block, dtype",
    [
        (None, torch.bfloat16),
        (None, torch.float32),
        ((16, 16), torch.bfloat16),
        ((32, 16), torch.bfloat16),
    ],
)
@pytest.mark.parametrize("M, N, K", [(1, 50, 72), (2, 50, 72), (9, 33, 40), (16, 48, 64)])
def test_skinny_gemm_fp8(M, N, K, block, dtype):
    with_bias = M in (1, 9)  # the GEMV and the dot path, each with and without
    g = torch.Generator().manual_seed(M * 100 + N + K)
    wq, s = _weights(g, N, K, block)
    x = _x(g, M, K, dtype)
    b = _x(g, 1, N, dtype)[0] if with_bias else None
    got = fg.skinny_gemm_fp8(x, wq, s, block, b)
    close(got, fg.skinny_gemm_fp8_ref(x, wq, s, block, b))


def test_skinny_gemm_fp8_rejects_more_than_m_max_rows():
    wq, s = fg.quantize_weight(torch.randn(16, 16))
    with pytest.raises(ValueError, match="at most 16 rows"):
        fg.skinny_gemm_fp8(torch.randn(17, 16), wq, s)


@pytest.mark.parametrize(
    "M, N, K, block",
    [(17, 50, 72, None), (40, 33, 48, None), (17, 50, 72, (16, 16)), (40, 33, 48, (32, 16))],
)
def test_scaled_gemm_fp8(M, N, K, block):
    g = torch.Generator().manual_seed(M + N + K)
    wq, s = _weights(g, N, K, block)
    x = _x(g, M, K, torch.bfloat16)
    b = _x(g, 1, N, torch.bfloat16)[0]
    xq, xs = fg.quantize_activations(x, None if block is None else block[1])
    got = fg.scaled_gemm_fp8(xq, xs, wq, s, block, b, torch.bfloat16)
    close(got, fg.scaled_gemm_fp8_ref(xq, xs, wq, s, block, b, torch.bfloat16))
    # and the whole W8A8 product stays near the bf16 product of the dequantized weight
    exact = fg.skinny_gemm_fp8_ref(x.float(), wq, s, block, b.float())
    torch.testing.assert_close(got.float(), exact, atol=0.08 * exact.abs().max().item(), rtol=0)


def test_fp8_linear_on_cpu_is_the_dequantized_linear():
    g = torch.Generator().manual_seed(3)
    wq, s = fg.quantize_weight(torch.randn(24, 32, generator=g), (16, 16))
    x = torch.randn(2, 5, 32, generator=g)
    got = fg.fp8_linear(x, wq, s, (16, 16))
    ref = x @ fg.dequantize_weight(wq, s, (16, 16), torch.float32).T
    torch.testing.assert_close(got, ref)


# -- GPU: Llama-3-8B shapes (N, K): qkv, o, gate_up, down -----------------------------------------

LLAMA3_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@cuda_only
@pytest.mark.parametrize("block", [None, (128, 128)])
@pytest.mark.parametrize("M", [1, 8, 16])
@pytest.mark.parametrize("N, K", LLAMA3_8B)
def test_skinny_gemm_fp8_llama3_shapes(M, N, K, block):
    g = torch.Generator().manual_seed(1)
    wq, s = _weights(g, N, K, block)
    x = _x(g, M, K, torch.bfloat16)
    close(fg.skinny_gemm_fp8(x, wq, s, block), fg.skinny_gemm_fp8_ref(x, wq, s, block))


@cuda_only
@pytest.mark.parametrize("block", [None, (128, 128)])
@pytest.mark.parametrize("M", [17, 256, 2048])
@pytest.mark.parametrize("N, K", LLAMA3_8B)
def test_fp8_linear_llama3_shapes(M, N, K, block):
    g = torch.Generator().manual_seed(2)
    wq, s = _weights(g, N, K, block)
    x = _x(g, M, K, torch.bfloat16)
    got = fg.fp8_linear(x, wq, s, block)
    exact = fg.skinny_gemm_fp8_ref(x.float(), wq, s, block)
    torch.testing.assert_close(got.float(), exact, atol=0.05 * exact.abs().max().item(), rtol=0)
