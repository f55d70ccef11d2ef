"""Packed GGUF rows (gguf_cpu.pack_rows: Q4_0 / Q4_1 / Q8_0 / K-quant rows interleaved 16 at a time, the layout
the CPU model loads): the layout as documented, the C++ dequantize and row dots on it, and the Python
functions that take either form."""

import numpy as np
import pytest
import torch

from radixserve.kernels import gguf_cpu
from tests.gguf_files import (
    T,
    gguf_cpu_extension,
    kernel_isas,
    quantize,
    random_blocks,
)

PACKABLE = [T(q) for q in gguf_cpu.PACKABLE_TYPES]
N = 48  # three groups of 16 rows
# 17 blocks of 32 (an odd count, a partial 16-block chunk); the K-quants: 3 super-blocks of 256
K_OF = {T.Q4_K: 3 * 256, T.Q5_K: 3 * 256, T.Q6_K: 3 * 256}


@pytest.fixture(scope="module")
def module():
    return gguf_cpu_extension()


def width(qtype) -> int:
    return K_OF.get(qtype, 17 * 32)


def file_rows(qtype, n=N, seed=0):
    rng = np.random.default_rng(seed)
    k = width(qtype)
    if qtype in K_OF:  # random valid blocks (the gguf package cannot quantize to K-quants)
        return torch.from_numpy(np.ascontiguousarray(random_blocks(n, k, qtype, rng)))
    return torch.from_numpy(
        np.ascontiguousarray(quantize(rng.standard_normal((n, k)) * 0.05, qtype))
    )


def values(rows: torch.Tensor, qtype) -> torch.Tensor:
    """The file's quantized integers [N, blocks of 32, 32] in value order (Q4: 0..15; Q8_0: int8)."""
    block = gguf_cpu.block_shape(qtype)[1]
    blocks = rows.reshape(rows.shape[0], -1, block)
    if qtype in (T.Q4_K, T.Q5_K):  # Q5_K: the low 4 bits
        # 8 blocks per super-block: 2i in the low nibbles of bytes 32 i.., 2i + 1 in the high ones
        qs = blocks[..., 16 if qtype == T.Q4_K else 48 :].long().reshape(rows.shape[0], -1, 4, 32)
        return torch.stack([qs & 15, qs >> 4], dim=3).reshape(rows.shape[0], -1, 32)
    if qtype == T.Q8_0:
        return blocks[..., 2:].view(torch.int8).long()
    qs = blocks[..., 4 if qtype == T.Q4_1 else 2 :].long()
    return torch.cat([qs & 15, qs >> 4], dim=-1)


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda q: T(q).name)
def test_packed_bytes_are_where_the_kernels_read_them(qtype):
    """The layout gguf_cpu_kernels.h documents, byte by byte (Q6_K: its d and scales; its values are
    checked through the C++ dequantize below), and pack_rows undone by unpack_rows."""
    rows = file_rows(qtype)
    packed = gguf_cpu.pack_rows(rows, int(qtype))
    assert packed.shape == rows.shape and packed.dtype == torch.uint8
    assert torch.equal(gguf_cpu.unpack_rows(packed, int(qtype)), rows)
    values_per_block, block = gguf_cpu.block_shape(qtype)
    nb = width(qtype) // values_per_block
    group_blocks = packed.reshape(N // 16, nb, 16 * block)  # group g, block (super-block) b
    if (
        qtype == T.Q6_K
    ):  # d (file bytes 208, 209) at 2 j, int8 scale s (file byte 192 + s) at 32 + 16 s + j
        file_blocks = rows.reshape(N, nb, block)
        for r in (0, 17, 47):
            g, j = divmod(r, 16)
            assert torch.equal(group_blocks[g, :, 2 * j : 2 * j + 2], file_blocks[r, :, 208:210])
            assert torch.equal(group_blocks[g, :, 32 + j : 288 : 16], file_blocks[r, :, 192:208])
        return
    v = values(rows, qtype)
    file_blocks = rows.reshape(N, nb, block)
    rng = np.random.default_rng(1)
    for _ in range(40):
        r, b = int(rng.integers(N)), int(rng.integers(nb))
        g, j = divmod(r, 16)
        gb = group_blocks[g, b]
        assert torch.equal(gb[2 * j : 2 * j + 2], file_blocks[r, b, 0:2])  # d
        start = 32
        if qtype in (T.Q4_1, T.Q4_K, T.Q5_K):  # m; the K-quants' dmin
            assert torch.equal(gb[32 + 2 * j : 34 + 2 * j], file_blocks[r, b, 2:4])
            start = 64
        if qtype in (T.Q4_K, T.Q5_K):  # the 12 scale bytes, then block s's Q4 chunks at 256 + 256 s
            assert torch.equal(gb[64 + j : 256 : 16], file_blocks[r, b, 4:16])
            s = int(rng.integers(8))
            gb, start, b = gb[256 * s :], 256, 8 * b + s
        for t in range(4):
            if qtype == T.Q8_0:
                for c in range(8):
                    byte = int(gb[start + 64 * c + 4 * j + t].view(torch.int8))
                    assert byte == int(v[r, b, 4 * c + t])
            else:
                for c in range(4):
                    byte = int(gb[start + 64 * c + 4 * j + t])
                    assert byte & 15 == int(v[r, b, 8 * c + t])
                    assert byte >> 4 == int(v[r, b, 8 * c + 4 + t])


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda q: T(q).name)
def test_dequantize_of_packed_rows_is_the_files(module, qtype):
    rows, k = file_rows(qtype, seed=2), width(qtype)
    packed, ptype = gguf_cpu.pack_rows(rows, int(qtype)), gguf_cpu.PACKED + int(qtype)
    whole = module.gguf_dequantize(rows, int(qtype), k)
    assert torch.equal(module.gguf_dequantize(packed, ptype, k), whole)
    ids = torch.tensor([17, 0, 47, 17, 31])
    assert torch.equal(module.gguf_dequantize_rows(packed, ptype, k, ids), whole[ids])
    assert torch.equal(module.gguf_dequantize_rows(rows, int(qtype), k, ids), whole[ids])
    # gguf_cpu's functions: the same values as for the file's rows, by either path
    assert torch.equal(
        gguf_cpu.dequantize(packed, ptype, k), gguf_cpu.dequantize(rows, int(qtype), k)
    )
    assert torch.equal(
        gguf_cpu.dequantize_rows(packed, ptype, k, ids),
        gguf_cpu.dequantize(rows, int(qtype), k)[ids],
    )
    assert torch.equal(
        gguf_cpu.dequantize_torch(packed, ptype, k), gguf_cpu.dequantize_torch(rows, int(qtype), k)
    )
    with pytest.raises(RuntimeError, match="out of range"):
        module.gguf_dequantize_rows(packed, ptype, k, torch.tensor([N]))


@pytest.mark.parametrize("qtype", PACKABLE, ids=lambda q: T(q).name)
def test_packed_row_dots_same_bits_alone_in_any_batch_and_on_either_isa(module, qtype):
    """A row's result must not depend on its batch-mates (NGRAM's outputs equal plain decoding's) nor on
    the CPU's kernel; and it is the reference's within the int8 activations' error."""
    rows, k = file_rows(qtype, seed=3), width(qtype)
    packed, ptype = gguf_cpu.pack_rows(rows, int(qtype)), gguf_cpu.PACKED + int(qtype)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(4)) * 3
    isas = kernel_isas(module)
    alone = {
        isa: torch.cat([module.gguf_matmul(x[i : i + 1], packed, ptype, isa) for i in range(17)])
        for isa in isas
    }
    assert torch.equal(alone[isas[0]], alone[isas[-1]])
    for isa in isas:
        for size in (2, 3, 5, 8, 9, 16, 17):
            got = module.gguf_matmul(x[:size].contiguous(), packed, ptype, isa)
            assert torch.equal(got, alone[isa][:size]), (isa, size)
    ref = gguf_cpu.gguf_linear_ref(x, rows, int(qtype))
    assert torch.equal(gguf_cpu.gguf_linear_ref(x, packed, ptype), ref)
    err = (alone[isas[0]] - ref).abs().max()
    assert err <= 1e-2 * ref.abs().max()
    # Integer activations with a 127 in every block quantize exactly: float32 summation order only
    xi = torch.randint(-127, 128, (3, k), generator=torch.Generator().manual_seed(5)).float()
    xi[:, ::32] = 127.0
    ref = gguf_cpu.gguf_linear_ref(xi, rows, int(qtype))
    got = gguf_cpu.gguf_linear(xi, packed, ptype)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_lm_head_logits_on_packed_rows(module):
    rows = file_rows(T.Q8_0, seed=6)
    packed, ptype = gguf_cpu.pack_rows(rows, int(T.Q8_0)), gguf_cpu.PACKED + int(T.Q8_0)
    x = torch.randn(5, width(T.Q8_0), generator=torch.Generator().manual_seed(7)).bfloat16()
    logits = gguf_cpu.gguf_logits(x, packed, ptype)
    assert torch.equal(logits, gguf_cpu.gguf_linear(x, packed, ptype).float())


def test_pack_takes_only_what_the_packed_kernels_run(module, monkeypatch):
    q41 = file_rows(T.Q4_1)
    qtype, packed = gguf_cpu.pack(int(T.Q4_1), q41)
    assert qtype == gguf_cpu.PACKED + T.Q4_1 and torch.equal(
        packed, gguf_cpu.pack_rows(q41, T.Q4_1)
    )
    uneven = file_rows(T.Q4_1, n=40)  # not whole groups of 16: kept as the file's rows
    assert gguf_cpu.pack(int(T.Q4_1), uneven) == (int(T.Q4_1), uneven)
    f16 = torch.zeros(16, 64, dtype=torch.float16)  # a float tensor: no blocks to pack
    assert gguf_cpu.pack(int(T.F16), f16) == (int(T.F16), f16)
    monkeypatch.setenv(gguf_cpu.PACK_SWITCH, "0")
    assert gguf_cpu.pack(int(T.Q4_1), q41) == (int(T.Q4_1), q41)
    with pytest.raises(RuntimeError, match="groups of 16"):
        module.gguf_matmul(torch.ones(1, width(T.Q4_1)), uneven, gguf_cpu.PACKED + int(T.Q4_1), 0)
