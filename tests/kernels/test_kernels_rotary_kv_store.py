"""Fused rotary + KV store (kernels/rotary_kv_store.py) against what it replaces: rotary then store.

Two comparisons per case: with the torch references (apply_rotary_ref then store_kv_ref), to the
shared tolerance of tests/kernels/kernel_checks.py (`close`), and with the rotary kernel
followed by the (copying) store reference, which must agree bit for bit:
the fused kernel does the same float32 math in the same order. Without a GPU the kernels run in the
Triton interpreter (TRITON_INTERPRET=1, set before triton is imported) on small shapes; on CUDA the
realistic 8B shapes are added (`-m cuda`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.kernels.rotary import apply_rotary  # noqa: E402
from radixserve.kernels.rotary_kv_store import (
    rotary_and_store_kv,
    rotary_and_store_kv_ref,
    store_kv_ref,
)  # noqa: E402
from radixserve.executor.layers.rotary import RotaryEmbedding  # noqa: E402
from radixserve.kernels.rotary import apply_rotary_ref  # noqa: E402
from tests.kernels.kernel_checks import (  # noqa: E402
    CUDA,
    DEVICE,
    DTYPES,
    close,
    cuda_only,
    exact_or_close,
    gen,
    randn,
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _check(
    T,
    hq,
    hk,
    head_dim,
    dtype,
    num_slots=64,
    max_pos=256,
    scaling=None,
    strided=False,
    with_padding=False,
    cache_dtype=None,
):
    g = gen(T * 19 + hq * 7 + hk * 3 + head_dim)
    cache_dtype = cache_dtype or dtype
    rope = RotaryEmbedding(
        head_dim,
        max_pos,
        500000.0 if scaling else 10000.0,
        scaling or {"rope_type": "default"},
        dtype,
    ).to(DEVICE)
    positions = torch.randint(0, max_pos, (T,), generator=g).to(DEVICE)
    if strided:  # q, k and v as views of one fused qkv projection output, as the models pass them
        qkv = randn(g, T, (hq + 2 * hk) * head_dim, dtype=dtype)
        q = qkv[:, : hq * head_dim].view(T, hq, head_dim)
        k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(T, hk, head_dim)
        v = qkv[:, (hq + hk) * head_dim :].view(T, hk, head_dim)
    else:
        q = randn(g, T, hq, head_dim, dtype=dtype)
        k = randn(g, T, hk, head_dim, dtype=dtype)
        v = randn(g, T, hk, head_dim, dtype=dtype)
    slots = torch.randperm(num_slots, generator=g)[:T].to(torch.int64)
    if with_padding:
        slots[::3] = -1
    slots = slots.to(DEVICE)
    k_cache = randn(g, num_slots, hk, head_dim, dtype=cache_dtype)
    v_cache = randn(g, num_slots, hk, head_dim, dtype=cache_dtype)
    k0, v0 = k.clone(), v.clone()
    tables = (rope.cos_table, rope.sin_table, positions)

    # reference: torch rotary, then torch store
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    q_ref = rotary_and_store_kv_ref(q, k, v, *tables, kc_ref, vc_ref, slots)
    # unfused: the rotary kernel (in place on copies of q and k), then the store (a copy)
    q_two, k_two = q.clone(), k.clone()
    kc_two, vc_two = k_cache.clone(), v_cache.clone()
    apply_rotary(q_two, k_two, *tables)
    store_kv_ref(k_two, v, kc_two, vc_two, slots)

    out = rotary_and_store_kv(q, k, v, *tables, k_cache, v_cache, slots)
    assert out is q
    close(q, q_ref)
    close(k_cache, kc_ref)
    exact_or_close(v_cache, vc_ref)  # a copy (cast to the cache dtype)
    assert torch.equal(q, q_two)
    if k_cache.dtype == k.dtype:
        assert torch.equal(k_cache, kc_two) and torch.equal(v_cache, vc_two)
    else:  # bit for bit but for a cast to a bf16 cache in the interpreter (it truncates; torch rounds)
        exact_or_close(k_cache, kc_two)
        exact_or_close(v_cache, vc_two)
    assert torch.equal(k, k0) and torch.equal(
        v, v0
    )  # k is read only: the rotated k lives in the cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T, hq, hk, head_dim", [(1, 4, 2, 64), (5, 4, 2, 128), (33, 4, 4, 64), (6, 6, 2, 96)]
)
def test_rotary_and_store_kv(T, hq, hk, head_dim, dtype):
    _check(T, hq, hk, head_dim, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_qkv_view_and_padding_slots(dtype):
    _check(7, 4, 2, 64, dtype, strided=True, with_padding=True)


def test_llama3_scaled_tables():
    _check(9, 4, 2, 64, torch.float32, max_pos=512, scaling=LLAMA3_SCALING)


def test_cache_dtype_differs():
    _check(5, 4, 2, 64, torch.float32, cache_dtype=torch.bfloat16)


def test_no_tokens():
    _check(0, 4, 2, 64, torch.float32)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 256])
def test_rotary_and_store_kv_cuda_realistic(T, dtype):
    _check(
        T,
        32,
        8,
        128,
        dtype,
        num_slots=100_000,
        max_pos=8192,
        scaling=LLAMA3_SCALING,
        strided=True,
        with_padding=T > 1,
    )


FP8 = [torch.float8_e5m2, torch.float8_e4m3fn]


def fp8_codes_apart(got: torch.Tensor, ref: torch.Tensor) -> int:
    """How many fp8 steps apart two fp8 tensors are at most (0: bit-equal)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    return int((got.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs().max())


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_scale, v_scale", [(1.0, 1.0), (0.37, 2.5)])
def test_fp8_cache_stores_x_over_scale(cache_dtype, dtype, k_scale, v_scale):
    g = gen(11)
    T, hq, hk, head_dim, num_slots = 9, 4, 2, 64, 32
    rope = RotaryEmbedding(head_dim, 64, 10000.0, {"rope_type": "default"}, dtype).to(DEVICE)
    positions = torch.randint(0, 64, (T,), generator=g).to(DEVICE)
    q = randn(g, T, hq, head_dim, dtype=dtype, scale=3.0)
    k = randn(g, T, hk, head_dim, dtype=dtype, scale=3.0)
    v = randn(g, T, hk, head_dim, dtype=dtype, scale=3.0)
    k[0, 0, :4] = 1e6  # past the fp8 range (after / scale): saturates, never inf/NaN
    v[1, 1, :4] = -1e6
    slots = (torch.randperm(num_slots - 1, generator=g)[:T] + 1).to(DEVICE)  # never slot 0
    slots[4] = -1
    k_cache = torch.zeros(num_slots, hk, head_dim, dtype=cache_dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    tables = (rope.cos_table, rope.sin_table, positions)
    q_ref = rotary_and_store_kv_ref(q, k, v, *tables, kc_ref, vc_ref, slots, k_scale, v_scale)
    rotary_and_store_kv(q, k, v, *tables, k_cache, v_cache, slots, k_scale, v_scale)
    close(q, q_ref)
    # The rotated k is rounded to k's dtype before quantizing; a bf16 rounding in the interpreter
    # truncates, which may move its fp8 value by one step. fp32 (and v, a plain copy) match exactly.
    assert fp8_codes_apart(k_cache, kc_ref) <= (0 if dtype == torch.float32 or CUDA else 1)
    assert fp8_codes_apart(v_cache, vc_ref) == 0
    assert torch.isfinite(k_cache.float()).all() and torch.isfinite(v_cache.float()).all()
    limit = torch.finfo(cache_dtype).max
    assert k_cache[slots[0], 0, 0].float() == limit and v_cache[slots[1], 1, 0].float() == -limit
    assert not k_cache[0].float().any(), "slot 0 (not in slots) untouched"
    # Read back times the scale, the cache holds x to fp8's precision.
    k_rot = apply_rotary_ref(q, k, *tables)[1]
    kept = torch.arange(T) != 4
    back = k_cache[slots[kept]].float() * k_scale
    want = k_rot[kept].float()
    inside = want.abs() < limit * k_scale
    rel = 2.0 ** -(3 if cache_dtype == torch.float8_e4m3fn else 2)
    torch.testing.assert_close(back[inside], want[inside], rtol=rel, atol=1e-2 * k_scale)
