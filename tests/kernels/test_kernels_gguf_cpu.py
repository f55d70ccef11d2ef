"""kernels/gguf_cpu.py: y = x W^T on GGUF blocks read back from a file the gguf package wrote, against
the reference (gguf.quants.dequantize, then a float32 matmul)."""

import numpy as np
import pytest
import torch

from radixserve.executor.gguf_loader import read_header, read_tensor, unpermute_rope_rows
from radixserve.kernels import gguf_cpu
from tests.gguf_files import (
    K_QUANTS,
    QUANTIZABLE,
    T,
    llama_cpp_permute,
    quantize,
    random_blocks,
    write_gguf,
)

N, K = 72, 512  # 72 rows: 4-row tiles and a tail


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """{qtype: uint8 rows} as read back from one GGUF file holding a weight of each type."""
    rng = np.random.default_rng(0)
    tensors = {}
    for qtype in QUANTIZABLE:
        tensors[f"w{int(qtype)}"] = (quantize(rng.standard_normal((N, K)) * 0.05, qtype), qtype)
    for qtype in K_QUANTS:
        tensors[f"w{int(qtype)}"] = (random_blocks(N, K, qtype, rng), qtype)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "w.gguf", tensors)
    _, infos = read_header(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    return {info.qtype: read_tensor(mapped, info) for info in infos}


def _close(got, ref, rel):
    err = (got.float() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), (err, ref.abs().max().item())


@pytest.mark.parametrize("qtype", [*QUANTIZABLE, *K_QUANTS], ids=lambda q: T(q).name)
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dequantize_rows", [None, 32], ids=["int8-dots", "dequantize-gemm"])
def test_kernel_matches_the_dequantizing_reference(
    stored, qtype, rows, dequantize_rows, monkeypatch
):
    monkeypatch.setattr(gguf_cpu, "DEQUANTIZE_ROWS", dequantize_rows)
    qweight = stored[qtype]
    assert qweight.dtype == torch.uint8 and qweight.shape[0] == N
    assert qweight.shape[1] == gguf_cpu.row_bytes(qtype, K)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(N)
    ref = gguf_cpu.gguf_linear_ref(x, qweight, qtype, bias)
    got = gguf_cpu.gguf_linear(x, qweight, qtype, bias)
    assert got.shape == (rows, N) and got.dtype == torch.float32
    # The kernels' types (all here) quantize the activations to int8 per 32 values (as llama.cpp does):
    # ~0.5% error; a type they do not run would be the dequantized product itself (1e-5).
    _close(got, ref, 1e-2 if qtype in gguf_cpu.FUSED_TYPES else 1e-5)
    _close(gguf_cpu.gguf_linear(x.bfloat16(), qweight, qtype, bias).float(), ref, 3e-2)


@pytest.mark.parametrize("qtype", [*QUANTIZABLE, *K_QUANTS], ids=lambda q: T(q).name)
def test_int8_dot_products_are_exact_for_activations_int8_represents(stored, qtype):
    """Integer activations whose every 32-block holds a +-127 quantize without error: the kernel then
    equals the reference up to float32 summation order."""
    if gguf_cpu.load() is None:
        pytest.skip("the GGUF CPU extension is unavailable on this machine")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-127, 128, (3, K), generator=g).float()
    x[:, ::32] = 127.0
    ref = gguf_cpu.gguf_linear_ref(x, stored[qtype], qtype)
    _close(gguf_cpu.gguf_linear(x, stored[qtype], qtype), ref, 1e-5)


@pytest.mark.parametrize("qtype", [*QUANTIZABLE, *K_QUANTS], ids=lambda q: T(q).name)
def test_a_rows_result_does_not_depend_on_its_batch(stored, qtype):
    """Bitwise: a request's tokens must not change with the requests batched beside it."""
    x = torch.randn(37, K, generator=torch.Generator().manual_seed(2))  # N = 72: one thread split
    batch = gguf_cpu.gguf_linear(x, stored[qtype], qtype)
    for i in (0, 5, 36):
        assert torch.equal(gguf_cpu.gguf_linear(x[i : i + 1], stored[qtype], qtype)[0], batch[i])


@pytest.mark.parametrize("qtype", [*QUANTIZABLE, *K_QUANTS], ids=lambda q: T(q).name)
def test_dequantize_is_the_gguf_packages(stored, qtype):
    import gguf

    ref = gguf.quants.dequantize(stored[qtype].numpy(), T(qtype))
    assert torch.equal(gguf_cpu.dequantize(stored[qtype], qtype, K), torch.from_numpy(ref))
    module = gguf_cpu.load()
    if module is not None:
        assert torch.equal(module.gguf_dequantize(stored[qtype], qtype, K), torch.from_numpy(ref))


def test_switched_off_the_torch_path_gives_the_reference(stored, monkeypatch):
    monkeypatch.setenv(gguf_cpu.ENV_SWITCH, "0")
    gguf_cpu.reset_for_tests()
    try:
        assert gguf_cpu.load() is None
        x = torch.randn(2, K)
        ref = gguf_cpu.gguf_linear_ref(x, stored[T.Q4_1], T.Q4_1)
        _close(gguf_cpu.gguf_linear(x, stored[T.Q4_1], T.Q4_1), ref, 1e-5)
    finally:
        gguf_cpu.reset_for_tests()


def test_rope_row_permutation_is_undone_on_quantized_rows(stored):
    heads, rows = 4, torch.arange(64 * 3).reshape(64, 3)
    permuted = torch.from_numpy(llama_cpp_permute(rows.numpy(), heads))
    assert not torch.equal(permuted, rows)
    assert torch.equal(unpermute_rope_rows(permuted, heads), rows)
    # Whole quantized rows move: the permuted blocks dequantize to the permuted values.
    q = stored[T.Q4_1][:64]
    back = unpermute_rope_rows(torch.from_numpy(llama_cpp_permute(q.numpy(), heads)), heads)
    assert torch.equal(back, q)
