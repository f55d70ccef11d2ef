"""MLA decode over a paged latent cache (kernels/mla_decode.py) against its torch reference.

Without CUDA the kernel runs under the interpreter (TRITON_INTERPRET=1, set before triton is
imported) on small shapes. The cache's slots are shuffled; slot 0 is a poison row of NaN that every
table padding entry points at, so a read past seq_len would show up as NaN. Heads that do not fill a
head block, a rope width that is not a power of two, several splits and an fp8 cache are covered.
Tolerance: float32 atol = rtol = 1e-4 (only the summation order differs).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.kernels.mla_decode import mla_decode, mla_decode_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(lens, heads, lora, rope, seed=0, pad=3):
    g = torch.Generator().manual_seed(seed)
    num_slots = 1 + sum(lens) + 5
    cache = torch.randn(num_slots, 1, lora + rope, generator=g)
    cache[0] = float("nan")
    perm = torch.randperm(num_slots - 1, generator=g) + 1
    table = torch.zeros(len(lens) + 2, max(lens) + pad, dtype=torch.int64)
    rows = torch.randperm(len(lens) + 2, generator=g)[: len(lens)]
    off = 0
    for b, n in enumerate(lens):
        table[rows[b], :n] = perm[off : off + n]
        off += n
    q = torch.randn(len(lens), heads, lora + rope, generator=g)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    return [t.to(DEVICE) for t in (q, cache, table, rows, lens_t)]


@pytest.mark.parametrize(
    "lens,heads,lora,rope,num_splits",
    [
        ([5, 1, 37], 4, 32, 8, 1),  # the tiny model's shape
        ([70, 3], 20, 32, 24, 3),  # two head blocks, several splits, rope not a power of two
    ],
)
def test_matches_reference(lens, heads, lora, rope, num_splits):
    q, cache, table, rows, lens_t = make_case(lens, heads, lora, rope)
    scale = (lora + rope) ** -0.5
    got = mla_decode(q, cache, table, rows, lens_t, scale, lora, num_splits=num_splits)
    ref = mla_decode_ref(q, cache, table, rows, lens_t, scale, lora)
    assert got.shape == (len(lens), heads, lora)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_fp8_cache_reads_back_times_scale():
    q, cache, table, rows, lens_t = make_case([9, 4], 4, 32, 8, seed=1)
    k_scale = 0.5
    cache8 = (cache.nan_to_num(0.0) / k_scale).to(torch.float8_e4m3fn)
    got = mla_decode(q, cache8, table, rows, lens_t, 0.3, 32, k_scale=k_scale)
    ref = mla_decode_ref(q, cache8, table, rows, lens_t, 0.3, 32, k_scale=k_scale)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
