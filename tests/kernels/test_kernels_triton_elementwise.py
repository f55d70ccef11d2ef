"""Triton elementwise kernels (kernels/rmsnorm.py, rotary.py, silu_mul.py) vs their torch refs (the KV store:
tests/kernels/test_kernels_rotary_kv_store.py).

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported), on small shapes; on CUDA one realistic shape per kernel is added. bf16 and fp16 both run
under the interpreter (triton 3.6), so float32, float16 and bfloat16 are tested everywhere. One caveat:
the interpreter converts fp32 -> bf16 by truncation (even with fp_downcast_rounding="rtne"), while the
GPU rounds to nearest even like torch; checks that are bit-exact on CUDA (the rounded residual add)
therefore fall back to the half-type tolerance for bf16 under the interpreter.

Tolerances: float32 1e-5 (atol and rtol); half types: atol = 1e-2 * max|ref|, rtol = 1e-2 (a
rounding step or so of the output dtype, since the kernels may fuse multiply-adds in another order).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.kernels.rmsnorm import (
    fused_add_rmsnorm,
    fused_add_rmsnorm_ref,
    rmsnorm,
    rmsnorm_ref,
)  # noqa: E402
from radixserve.kernels.rotary import apply_rotary, apply_rotary_ref  # noqa: E402
from radixserve.kernels.silu_mul import (  # noqa: E402
    gelu_tanh_and_mul,
    gelu_tanh_and_mul_ref,
    silu_and_mul,
    silu_and_mul_ref,
)
from radixserve.executor.layers.norm import RMSNorm  # noqa: E402
from radixserve.executor.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.kernels.kernel_checks import DEVICE, DTYPES, close, cuda_only, exact_or_close, gen, randn  # noqa: E402


# ---------------------------------------------------------------- rmsnorm


def _check_rmsnorm(T, hidden, dtype):
    g = gen(T * 7 + hidden)
    x = randn(g, T, hidden, dtype=dtype, scale=2.0)
    res = randn(g, T, hidden, dtype=dtype)
    w = randn(g, hidden, dtype=dtype, scale=0.5) + 1.0
    eps = 1e-6
    close(rmsnorm(x, w, eps), rmsnorm_ref(x, w, eps))
    x0, r0 = x.clone(), res.clone()
    out, new_res = fused_add_rmsnorm(x, res, w, eps)
    ref_out, ref_res = fused_add_rmsnorm_ref(x, res, w, eps)
    exact_or_close(new_res, ref_res)  # one rounding of an exact fp32 sum
    close(out, ref_out)
    assert torch.equal(x, x0) and torch.equal(res, r0)  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, hidden", [(1, 64), (5, 96), (33, 576)])
def test_rmsnorm(T, hidden, dtype):
    _check_rmsnorm(T, hidden, dtype)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 8192])
def test_rmsnorm_cuda_realistic(hidden, dtype):
    _check_rmsnorm(128, hidden, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_unit_offset_is_gemmas(dtype):
    """unit_offset: x / rms(x) * (1 + w) in float32, rounded once (Gemma's norm, on the CPU its
    torch code), alone and after the residual add."""
    from radixserve.executor.models.gemma import GemmaRMSNorm

    g = gen(3)
    layer = GemmaRMSNorm(96, eps=1e-6).to(DEVICE, dtype)
    layer.weight.data.copy_(randn(g, 96, dtype=dtype, scale=0.5))
    x, res = randn(g, 5, 96, dtype=dtype, scale=2.0), randn(g, 5, 96, dtype=dtype)
    want = layer._normalize(x.clone())
    close(rmsnorm_ref(x, layer.weight, 1e-6, unit_offset=True), want)
    close(rmsnorm(x, layer.weight, 1e-6, unit_offset=True), want)
    out, new_res = fused_add_rmsnorm(x, res, layer.weight, 1e-6, unit_offset=True)
    exact_or_close(new_res, x + res)
    close(out, layer._normalize(x + res))


def test_rmsnorm_ref_matches_layer():
    g = gen(1)
    layer = RMSNorm(96, eps=1e-5).to(DEVICE, torch.bfloat16)
    layer.weight.data.copy_(randn(g, 96, dtype=torch.bfloat16) + 1.0)
    x = randn(g, 5, 96, dtype=torch.bfloat16)
    res = randn(g, 5, 96, dtype=torch.bfloat16)
    assert torch.equal(rmsnorm_ref(x, layer.weight, 1e-5), layer(x.clone()))
    want_out, want_res = layer(x.clone(), res.clone())
    out, new_res = fused_add_rmsnorm(x, res, layer.weight, 1e-5)
    exact_or_close(new_res, want_res)
    close(out, want_out)


# ---------------------------------------------------------------- rotary


def _check_rotary(T, hq, hk, head_dim, dtype, max_pos=256, strided=False):
    g = gen(T * 13 + hq * 5 + head_dim)
    rope = RotaryEmbedding(head_dim, max_pos, 10000.0, {"rope_type": "default"}, dtype).to(DEVICE)
    positions = torch.randint(0, max_pos, (T,), generator=g).to(DEVICE)
    if strided:  # q and k as views of one fused qkv projection output
        qkv = randn(g, T, (hq + 2 * hk) * head_dim, dtype=dtype)
        q = qkv[:, : hq * head_dim].view(T, hq, head_dim)
        k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(T, hk, head_dim)
    else:
        q = randn(g, T, hq, head_dim, dtype=dtype)
        k = randn(g, T, hk, head_dim, dtype=dtype)
    ref_q, ref_k = apply_rotary_ref(q, k, rope.cos_table, rope.sin_table, positions)
    if strided:
        v_before = qkv[:, (hq + hk) * head_dim :].clone()
    apply_rotary(q, k, rope.cos_table, rope.sin_table, positions)
    close(q, ref_q)
    close(k, ref_k)
    if strided:
        assert torch.equal(qkv[:, (hq + hk) * head_dim :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, hq, hk, head_dim", [(1, 4, 2, 64), (5, 4, 2, 128), (33, 4, 4, 64)])
def test_rotary(T, hq, hk, head_dim, dtype):
    _check_rotary(T, hq, hk, head_dim, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_strided_qkv_view(dtype):
    _check_rotary(5, 4, 2, 64, dtype, strided=True)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_cuda_realistic(dtype):
    _check_rotary(128, 32, 8, 128, dtype, max_pos=4096)


def test_rotary_ref_matches_layer():
    g = gen(3)
    rope = RotaryEmbedding(64, 128, 10000.0, {"rope_type": "default"}, torch.float32).to(DEVICE)
    positions = torch.randint(0, 128, (5,), generator=g).to(DEVICE)
    q = randn(g, 5, 4, 64, dtype=torch.float32)
    k = randn(g, 5, 2, 64, dtype=torch.float32)
    cos, sin = rope.cos_sin(positions)
    ref_q, ref_k = apply_rotary_ref(q, k, rope.cos_table, rope.sin_table, positions)
    close(ref_q, RotaryEmbedding.apply(q, cos, sin))
    close(ref_k, RotaryEmbedding.apply(k, cos, sin))


# ---------------------------------------------------------------- silu_and_mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, inter", [(1, 64), (5, 96), (33, 1536)])
def test_silu_and_mul(T, inter, dtype):
    g = gen(T * 11 + inter)
    gu = randn(g, T, 2 * inter, dtype=dtype, scale=3.0)
    close(silu_and_mul(gu), silu_and_mul_ref(gu))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, inter", [(1, 64), (33, 1536)])
def test_gelu_tanh_and_mul(T, inter, dtype):
    """Gemma's GeGLU (layers/activation.py's GeluAndMul off CUDA is the reference)."""
    g = gen(T * 13 + inter)
    gu = randn(g, T, 2 * inter, dtype=dtype, scale=3.0)
    close(gelu_tanh_and_mul(gu), gelu_tanh_and_mul_ref(gu))


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_cuda_realistic(dtype):
    g = gen(5)
    gu = randn(g, 128, 2 * 14336, dtype=dtype, scale=3.0)
    close(silu_and_mul(gu), silu_and_mul_ref(gu))
