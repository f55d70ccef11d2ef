"""Paged extend (prefill over a cached prefix) attention against its torch reference.

Like test_kernels_decode_attention: under TRITON_INTERPRET=1 without CUDA, slots shuffled, slot 0
poisoned with NaN and every table entry past a sequence's length pointing at it, so a read past the
causal horizon shows up as NaN. q rows that belong to no sequence (a decode tail) must stay untouched.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.kernels.extend_attention import extend_attention, extend_attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(prefixes, q_lens, heads, kv_heads, head_dim, dtype, seed=0, tail=2):
    g = torch.Generator().manual_seed(seed)
    S = len(prefixes)
    width = max(p + n for p, n in zip(prefixes, q_lens)) + 3
    num_slots = 1 + sum(p + n for p, n in zip(prefixes, q_lens)) + 5
    k = torch.randn(num_slots, kv_heads, head_dim, generator=g)
    v = torch.randn(num_slots, kv_heads, head_dim, generator=g)
    k[0] = v[0] = float("nan")
    perm = torch.randperm(num_slots - 1, generator=g) + 1
    rows = torch.randperm(S + 2, generator=g)[:S]  # sequences live in scattered table rows
    table = torch.zeros(S + 2, width, dtype=torch.int32)
    off = 0
    for s, (p, n) in enumerate(zip(prefixes, q_lens)):
        table[rows[s], : p + n] = perm[off : off + p + n].int()
        off += p + n
    starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)[:-1]), dtype=torch.int32)
    T = sum(q_lens) + tail
    q = torch.randn(T, heads, head_dim, generator=g)
    to = dict(device=DEVICE)
    ints = [
        x.to(dtype=torch.int32, **to)
        for x in (rows, torch.tensor(prefixes), starts, torch.tensor(q_lens))
    ]
    return (
        q.to(dtype=dtype, **to),
        k.to(dtype=dtype, **to),
        v.to(dtype=dtype, **to),
        table.to(**to),
        *ints,
        max(q_lens),
        head_dim**-0.5,
    )


def run_and_check(case, dtype, atol, k_scale=1.0, v_scale=1.0, **kw):
    q, k, v, table, rows, prefixes, starts, q_lens, max_q, scale = case
    out = torch.full_like(q, 7.0)
    got = extend_attention(
        q,
        k,
        v,
        table,
        rows,
        prefixes,
        starts,
        q_lens,
        max_q,
        scale,
        out=out,
        k_scale=k_scale,
        v_scale=v_scale,
        **kw,
    )
    ref = extend_attention_ref(
        q.cpu(),
        k.cpu(),
        v.cpu(),
        table.cpu(),
        rows.cpu(),
        prefixes.cpu(),
        starts.cpu(),
        q_lens.cpu(),
        max_q,
        scale,
        k_scale,
        v_scale,
    )
    n = int(q_lens.sum())
    assert torch.isfinite(got[:n].float()).all()
    torch.testing.assert_close(got[:n].float().cpu(), ref[:n].float(), atol=atol, rtol=atol)
    assert (got[n:] == 7.0).all(), "rows past the extend tokens must be left alone"


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 3), (2, 2)])
@pytest.mark.parametrize("prefixes, q_lens", [([0], [21]), ([13, 0, 40], [5, 33, 2]), ([64], [1])])
def test_fp32(heads, kv_heads, prefixes, q_lens):
    case = make_case(prefixes, q_lens, heads, kv_heads, 32, torch.float32, seed=heads + len(q_lens))
    run_and_check(case, torch.float32, 1e-4, block_m=16, block_n=16)


def test_head_dim_not_power_of_two():
    case = make_case([7, 0], [19, 9], 4, 1, 48, torch.float32, seed=3)
    run_and_check(case, torch.float32, 1e-4, block_m=16, block_n=16)


def test_fp16():
    case = make_case([30, 3], [17, 12], 4, 2, 64, torch.float16, seed=4)
    run_and_check(case, torch.float16, 2e-2, block_m=16, block_n=16)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_kv_cache_with_scales(kv_dtype, dtype):
    # The cache holds k / k_scale, v / v_scale in fp8; the reference dequantizes the same cache.
    q, k, v, *rest = make_case([30, 0, 3], [17, 9, 12], 4, 2, 64, dtype, seed=8)
    k_scale, v_scale = 0.5, 4.0
    k8, v8 = (k.float() / k_scale).to(kv_dtype), (v.float() / v_scale).to(kv_dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    case = (q, k8, v8, *rest)
    run_and_check(case, dtype, tol, k_scale, v_scale, block_m=16, block_n=16)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [128, 256])
def test_cuda_realistic(head_dim):
    case = make_case([0, 1000, 37, 0], [512, 300, 1, 2048], 32, 8, head_dim, torch.bfloat16, seed=1)
    run_and_check(case, torch.bfloat16, 2e-2)


@pytest.mark.parametrize("window, softcap", [(7, None), (20, 1.5), (None, 1.5)])
def test_sliding_window_and_softcap(window, softcap):
    # Windows shorter and longer than a 16-key block, over prefixes of every kind.
    case = make_case([13, 0, 40], [5, 33, 2], 4, 2, 32, torch.float32, seed=12)
    opts = dict(window=window, softcap=softcap)
    q, k, v, table, rows, prefixes, starts, q_lens, max_q, scale = case
    out = extend_attention(
        q, k, v, table, rows, prefixes, starts, q_lens, max_q, scale, block_m=16, block_n=16, **opts
    )
    ref = extend_attention_ref(*(x.cpu() for x in case[:8]), max_q, scale, **opts)
    n = int(q_lens.sum())
    torch.testing.assert_close(out[:n].cpu(), ref[:n], atol=1e-4, rtol=1e-4)
    plain = extend_attention_ref(*(x.cpu() for x in case[:8]), max_q, scale)
    assert not torch.allclose(ref[:n], plain[:n], atol=1e-2)  # the options change the answer
