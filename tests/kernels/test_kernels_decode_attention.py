"""Paged decode attention (kernels/decode_attention.py) against its torch reference.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before triton is
imported) on small shapes. The KV pool's slots are shuffled, so each sequence's slots are non-contiguous;
slot 0 is a poison slot full of NaN and every slot_table padding entry points at it, so any read past
seq_len would show up as NaN in the output.

Tolerances: float32 atol = rtol = 1e-4 (fp32 accumulation, only the summation order differs);
float16 / bfloat16 atol = rtol = 2e-2 (bfloat16 only on CUDA: the interpreter's tl.dot mishandles
bf16 operands; the softmax probabilities are rounded to the input dtype before the
P.V product, and the output is rounded to the input dtype).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    default_num_splits,  # noqa: E402
    num_splits_for_batch,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def make_case(
    lens, heads, kv_heads, head_dim, dtype, seed=0, extra_slots=7, pad=3, idx_dtype=torch.int32
):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    max_len = max(lens) + pad
    num_slots = 1 + sum(lens) + extra_slots
    k = torch.randn(num_slots, kv_heads, head_dim, generator=g)
    v = torch.randn(num_slots, kv_heads, head_dim, generator=g)
    k[0] = float("nan")
    v[0] = float("nan")
    perm = torch.randperm(num_slots - 1, generator=g) + 1  # shuffled, never slot 0
    table = torch.zeros(B, max_len, dtype=torch.int64)  # padding -> poison slot 0
    off = 0
    for b, n in enumerate(lens):
        table[b, :n] = perm[off : off + n]
        off += n
    q = torch.randn(B, heads, head_dim, generator=g)
    to = dict(device=DEVICE)
    return (
        q.to(dtype=dtype, **to),
        k.to(dtype=dtype, **to),
        v.to(dtype=dtype, **to),
        table.to(dtype=idx_dtype, **to),
        torch.tensor(lens, dtype=torch.int32, **to),
        head_dim**-0.5,
    )


def check(got, ref, dtype):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.isfinite(got.float()).all()
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (9, 3), (4, 4)])
@pytest.mark.parametrize("lens", [[1], [17, 70], [1, 17, 70]])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp32(heads, kv_heads, lens, num_splits):
    q, k, v, table, seq_lens, scale = make_case(
        lens, heads, kv_heads, 64, torch.float32, seed=len(lens) + heads
    )
    got = decode_attention(q, k, v, table, seq_lens, scale, num_splits=num_splits, block_n=16)
    check(got, decode_attention_ref(q, k, v, table, seq_lens, scale), torch.float32)


def test_default_splits_and_int64_table():
    # max_len 600 -> default 3 splits; each sequence splits its own length in whole 64-token blocks,
    # so length 5 leaves two splits empty.
    assert (
        default_num_splits(600) == 3
        and default_num_splits(1) == 1
        and default_num_splits(10**6) == 16
    )
    q, k, v, table, seq_lens, scale = make_case(
        [5, 130, 597], 4, 2, 64, torch.float32, seed=3, pad=3, idx_dtype=torch.int64
    )
    got = decode_attention(q, k, v, table, seq_lens, scale)
    check(got, decode_attention_ref(q, k, v, table, seq_lens, scale), torch.float32)


def test_head_dim_not_power_of_two_and_zero_len():
    # head_dim 80 (BLOCK_D 128, masked); a zero-length sequence gives zeros, not NaN.
    q, k, v, table, seq_lens, scale = make_case([0, 9, 33], 6, 2, 80, torch.float32, seed=5)
    got = decode_attention(q, k, v, table, seq_lens, scale, num_splits=2, block_n=16)
    ref = decode_attention_ref(q, k, v, table, seq_lens, scale)
    check(got, ref, torch.float32)
    assert (got[0] == 0).all()


def test_rows_index_a_persistent_table():
    # The executor keeps one request-to-slot table and passes each sequence's row.
    q, k, v, table, seq_lens, scale = make_case([40, 3, 65], 4, 2, 32, torch.float32, seed=9)
    wide = torch.zeros(6, table.shape[1], dtype=table.dtype, device=table.device)
    rows = torch.tensor([4, 0, 2], dtype=torch.int32, device=table.device)
    wide[rows.long()] = table
    got = decode_attention(q, k, v, wide, seq_lens, scale, num_splits=4, block_n=16, rows=rows)
    check(got, decode_attention_ref(q, k, v, table, seq_lens, scale), torch.float32)
    check(got, decode_attention_ref(q, k, v, wide, seq_lens, scale, rows=rows), torch.float32)


def test_num_splits_for_batch():
    assert num_splits_for_batch(1, 8, 132) == 16
    assert num_splits_for_batch(16, 8, 132) == 4
    assert num_splits_for_batch(128, 8, 132) == 1
    assert num_splits_for_batch(3, 8, 132, max_splits=8) == 8


# The Triton 3.6 interpreter's tl.dot returns garbage for bfloat16 operands: bf16 is a CUDA case.
@pytest.mark.parametrize(
    "dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda)]
)
def test_half(dtype):
    q, k, v, table, seq_lens, scale = make_case([1, 17, 70], 9, 3, 64, dtype, seed=11)
    got = decode_attention(q, k, v, table, seq_lens, scale, num_splits=3, block_n=16)
    check(got, decode_attention_ref(q, k, v, table, seq_lens, scale), dtype)


@pytest.mark.cuda  # realistic size: selected on a GPU machine (`-m cuda`)
@pytest.mark.parametrize("head_dim", [128, 256])
def test_cuda_realistic(head_dim):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 4097, (32,), generator=g).tolist()
    lens[0], lens[1] = 1, 4096
    q, k, v, table, seq_lens, scale = make_case(
        lens, 32, 8, head_dim, torch.bfloat16, seed=1, pad=0
    )
    ref = decode_attention_ref(q, k, v, table, seq_lens, scale)
    for ns in (None, 1, 16):
        got = decode_attention(q, k, v, table, seq_lens, scale, num_splits=ns)
        check(got, ref, torch.bfloat16)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_kv_cache_with_scales(kv_dtype, dtype):
    # An fp8 cache holds k / k_scale and v / v_scale; the kernel reads it back times the scales and
    # must match the reference over the same dequantized cache (the fp8 rounding is in both).
    q, k, v, table, seq_lens, scale = make_case([1, 17, 70], 8, 2, 64, dtype, seed=21)
    k_scale, v_scale = 0.25, 3.0
    k8, v8 = (k.float() * 4 / k_scale).to(kv_dtype), (v.float() / v_scale).to(kv_dtype)
    got = decode_attention(
        q,
        k8,
        v8,
        table,
        seq_lens,
        scale,
        num_splits=3,
        block_n=16,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    ref = decode_attention_ref(q, k8, v8, table, seq_lens, scale, k_scale=k_scale, v_scale=v_scale)
    check(got, ref, dtype)
    # and the dequantization is really applied: the scales change the answer as x * scale would
    unscaled = decode_attention_ref(q, k8, v8, table, seq_lens, scale)
    assert not torch.allclose(got.float(), unscaled.float(), atol=0.1)


@pytest.mark.cuda  # Llama-3-8B decode with an fp8 pool at the rate-inf shape: `-m cuda` on a GPU
@pytest.mark.parametrize("kv_dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
def test_cuda_realistic_fp8(kv_dtype):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(512, 769, (256,), generator=g).tolist()
    q, k, v, table, seq_lens, scale = make_case(lens, 32, 8, 128, torch.bfloat16, seed=2, pad=0)
    k8, v8 = (k.float() / 0.5).to(kv_dtype), (v.float() / 2.0).to(kv_dtype)
    ref = decode_attention_ref(q, k8, v8, table, seq_lens, scale, k_scale=0.5, v_scale=2.0)
    for ns, fp16_math in ((None, None), (1, False), (16, False), (None, True), (16, True)):
        got = decode_attention(
            q,
            k8,
            v8,
            table,
            seq_lens,
            scale,
            num_splits=ns,
            k_scale=0.5,
            v_scale=2.0,
            fp16_math=fp16_math,
        )
        check(got, ref, torch.bfloat16)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
def test_fp8_cache_bf16_queries_in_fp16_math(kv_dtype):
    # fp16_math: the block products of a bf16 q over an fp8 cache run in fp16 (the interpreter's fp16
    # dot is right, so this runs on the CPU too); a q entry past fp16's range is clamped, not inf/NaN.
    q, k, v, table, seq_lens, scale = make_case([1, 17, 70], 8, 2, 64, torch.float32, seed=23)
    q = q.to(torch.bfloat16)
    k8, v8 = (k / 0.5).to(kv_dtype), (v / 2.0).to(kv_dtype)
    kw = dict(num_splits=3, block_n=16, k_scale=0.5, v_scale=2.0)
    got = decode_attention(q, k8, v8, table, seq_lens, scale, fp16_math=True, **kw)
    ref = decode_attention_ref(q, k8, v8, table, seq_lens, scale, k_scale=0.5, v_scale=2.0)
    check(got, ref, torch.bfloat16)
    big = q.clone()
    big[0, 0, 0] = 1e6  # bf16 holds it; fp16 tops out at 65504
    got = decode_attention(big, k8, v8, table, seq_lens, scale, fp16_math=True, **kw)
    assert torch.isfinite(got.float()).all()
    clamped = big.float().clamp(-65504, 65504)
    ref = decode_attention_ref(clamped, k8, v8, table, seq_lens, scale, k_scale=0.5, v_scale=2.0)
    check(got, ref.to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("window, softcap", [(8, None), (20, 1.5), (None, 1.5)])
def test_sliding_window_and_softcap(window, softcap):
    # The slots before each sequence's window are poisoned with NaN: the kernel must never read them.
    lens = [1, 17, 70]
    q, k, v, table, seq_lens, scale = make_case(lens, 4, 2, 64, torch.float32, seed=31)
    for b, n in enumerate(lens):
        if window and n > window:
            before = table[b, : n - window].long()
            k[before] = v[before] = float("nan")
    opts = dict(window=window, softcap=softcap)
    got = decode_attention(q, k, v, table, seq_lens, scale, num_splits=3, block_n=16, **opts)
    ref = decode_attention_ref(q, k, v, table, seq_lens, scale, **opts)
    check(got, ref, torch.float32)
    if not window:  # the cap changes the answer
        plain = decode_attention_ref(q, k, v, table, seq_lens, scale)
        assert not torch.allclose(got, plain, atol=1e-2)
