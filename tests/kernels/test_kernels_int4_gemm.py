"""kernels/int4_gemm.py (int4 weight-only GEMM and dequantization) against F.linear on the weight that the
tests' own round-to-nearest quantizer (tests/int4_quantizer.py) says the codes stand for.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1) on small shapes whose K is
not a multiple of the 128-row pack (padded rows) and N not a multiple of the blocks (clamped features);
on CUDA (`-m cuda`) the Llama-3-8B shapes are added. Tolerances (tests/kernels/kernel_checks.py): float32
1e-5; half types 2e-2 of max|ref|: the tensor-core path rounds each dequantized weight to x.dtype.
"""

import functools
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from radixserve.executor.quantization.int4_linear import to_kernel_layout  # noqa: E402
from radixserve.kernels import int4_gemm as ig  # noqa: E402
from tests.int4_quantizer import groups_of, quantize  # noqa: E402
from tests.kernels.kernel_checks import CUDA, DEVICE, close, cuda_only  # noqa: E402


@functools.lru_cache(maxsize=8)  # the CUDA tests reuse each Llama shape's weight
def quantized_weight(n, k, group_size, act_order=False, seed=0):
    """(Int4Weight on DEVICE, the dequantized float32 weight [N, K] on DEVICE)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    g_idx = groups_of(k, group_size, seed + 1 if act_order else None)
    qz = quantize(w, g_idx)
    group = k if group_size == -1 else group_size
    weight = to_kernel_layout(
        qz.codes.to(torch.uint8),
        qz.zeros.to(torch.uint8),
        qz.scales,
        g_idx if act_order else None,
        group,
    )
    weight = ig.Int4Weight(
        **{f: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for f, v in vars(weight).items()}
    )
    return weight, qz.dequantized.to(DEVICE)


def check(m, weight, dequantized, dtype, bias=True, seed=0, config=None):
    g = torch.Generator().manual_seed(seed + m)
    x = torch.randn(m, weight.in_features, generator=g).to(DEVICE, dtype)
    b = torch.randn(weight.out_features, generator=g).to(DEVICE, dtype) if bias else None
    ref = F.linear(x.float(), dequantized, None if b is None else b.float()).to(dtype)
    close(ig.int4_gemm(x, weight, b, config=config), ref, tol=2e-2)
    return x, b, ref


def test_pack_roundtrip_and_padding():
    q = torch.randint(
        0, 16, (200, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    packed = ig.pack(q)
    assert packed.shape == (24, 256 // 8) and packed.dtype == torch.int32
    assert torch.equal(ig.unpack(packed, 200), q)
    assert torch.equal(ig.unpack(packed, 256)[200:], torch.zeros(56, 24, dtype=torch.uint8))
    # rows 16 j + r of a pack sit in nibble j of column r
    one = torch.zeros(128, 8, dtype=torch.uint8)
    one[16 * 5 + 3, 2] = 9
    assert ig.pack(one)[2, 3].item() == 9 << 20 and ig.pack(one).count_nonzero() == 1


@pytest.fixture(params=ig.GEMV_KERNELS)
def gemv(request, monkeypatch):
    """Each GEMV kernel (M = 1) in turn: half2, half2_late and the float32 one they are timed against."""
    monkeypatch.setattr(ig, "GEMV_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_contiguous_groups(group_size, gemv):
    """AWQ and GPTQ without act-order: M = 1 (GEMV), 2..16 (tensor cores), 80 (the tiled class)."""
    weight, deq = quantized_weight(24, 256, group_size)
    assert weight.g_idx is None and weight.perm is None and weight.group_size == group_size
    torch.testing.assert_close(ig.dequantize_reference(weight), deq)
    for m in (1, 5, 80):
        check(m, weight, deq, torch.bfloat16)
    check(3, weight, deq, torch.float32, bias=False)


def test_every_decode_m():
    weight, deq = quantized_weight(16, 128, 64, seed=3)
    for m in range(1, 17):
        check(m, weight, deq, torch.bfloat16, bias=m % 2 == 0)


def test_one_group_and_fp16(gemv):
    weight, deq = quantized_weight(24, 136, -1)
    assert weight.group_size == 256  # the padded K: one group
    for m in (1, 7):
        check(m, weight, deq, torch.float16)


def test_act_order_permuted_at_load(gemv):
    """GPTQ act-order whose groups are contiguous once sorted: rows permuted once, x gathered per call."""
    weight, deq = quantized_weight(32, 256, 32, act_order=True)
    assert weight.g_idx is None and weight.perm is not None
    for m in (1, 9, 70):
        check(m, weight, deq, torch.bfloat16)


def test_per_row_groups_gathered(gemv):
    """Groups that stay scattered (a row-parallel rank's act-order rows): scales gathered through g_idx."""
    k, n, group = 192, 24, 32
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=g) * k**-0.5
    g_idx = torch.randint(0, 8, (k,), generator=g, dtype=torch.int32)  # 8 groups, uneven, any row
    qz = quantize(w, g_idx)
    weight = to_kernel_layout(
        qz.codes.to(torch.uint8), qz.zeros.to(torch.uint8), qz.scales, g_idx, group
    )
    assert weight.g_idx is not None and weight.perm is None
    weight = ig.Int4Weight(**{**vars(weight), "packed": weight.packed.to(DEVICE)})
    weight.scales, weight.zeros = weight.scales.to(DEVICE), weight.zeros.to(DEVICE)
    weight.g_idx = weight.g_idx.to(DEVICE)
    deq = qz.dequantized.to(DEVICE)
    for m in (1, 4, 33):
        check(m, weight, deq, torch.bfloat16)
    torch.testing.assert_close(ig.dequantize(weight, torch.float32), deq)


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_kernel_and_linear_switch(monkeypatch, act_order):
    weight, deq = quantized_weight(24, 256, 64, act_order=act_order)
    torch.testing.assert_close(
        ig.dequantize(weight, torch.float32), ig.dequantize_reference(weight)
    )
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref = F.linear(x, deq)
    monkeypatch.setattr(ig, "KERNEL_DEVICES", ("cuda", DEVICE))
    monkeypatch.setattr(ig, "DEQUANT_MIN_M", 4)  # 6 rows: dequantize + F.linear
    torch.testing.assert_close(ig.int4_linear(x, weight), ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(ig, "DEQUANT_MIN_M", 1024)  # the tiled kernel
    torch.testing.assert_close(ig.int4_linear(x, weight), ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(ig, "KERNEL_DEVICES", ())  # the torch reference
    torch.testing.assert_close(ig.int4_linear(x, weight), ref, atol=1e-5, rtol=1e-5)


def test_gpu_block_shapes():
    """Each class's GPU config (BLOCK_K as the GPU uses it: K = 512 runs 1 step of 4 packs)."""
    weight, deq = quantized_weight(40, 512, 128, seed=7)
    for largest, config in ig.M_CLASSES:
        m = 3 if largest is None else largest
        check(m, weight, deq, torch.bfloat16, config={**config, "num_stages": 1})


@pytest.mark.parametrize("split", [1, 2, 4])
def test_gemv_split_k(split, gemv):
    """The GEMV over 1, 2 or 4 runs of K (partials added atomically; the bias counted once), and the
    split chosen per shape: doubled while the programs are fewer than GEMV_PROGRAMS_PER_SM per SM."""
    weight, deq = quantized_weight(40, 512, 128, seed=3)
    config = dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=128, num_warps=2, num_stages=1, SPLIT_K=split)
    check(1, weight, deq, torch.bfloat16, config=config)
    cpu = torch.device("cpu")  # 8 SMs assumed off the GPU: a target of 32 programs
    assert ig.gemv_split_k(5, 512, 128, cpu) == 4  # 5 -> 10 -> 20 -> 40 programs, 4 steps of K
    assert ig.gemv_split_k(5, 512, 256, cpu) == 2  # two steps of K: no more than 2 runs
    assert ig.gemv_split_k(64, 4096, 1024, cpu) == 1


def test_gemv_kernel_choice():
    """half2 for half x (the default), float32 for float32 x whatever the choice; unknown names refused."""
    assert ig.gemv_kernel(torch.bfloat16) == "half2"
    assert ig.gemv_kernel(torch.float16, "half2_late") == "half2_late"
    assert ig.gemv_kernel(torch.bfloat16, "float32") == "float32"
    assert ig.gemv_kernel(torch.float32, "half2") == "float32"
    with pytest.raises(AssertionError):
        ig.gemv_kernel(torch.bfloat16, "int8")


@pytest.mark.parametrize("choice", ig.GEMV_KERNELS)
def test_gemv_every_code_and_zero(choice):
    """Every code 0..15 at every nibble j against every zero point 0..15, group 128 (one pack) and 64
    (nibbles j and j + 4 of a word in different groups), with large and small x: each nibble's code,
    zero and scale land on their own row. The half2 kernel rounds (q - z) * s and its products to
    float16 (2^-11), well inside the tolerance; a code read from a wrong nibble is far outside it."""
    n, k = 16, 256
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    codes[:, 0] = torch.arange(k) % 16  # feature 0: every code at every row class
    for group in (128, 64):
        groups = k // group
        zeros = torch.randint(0, 16, (groups, n), generator=g, dtype=torch.uint8)
        zeros[:, 1] = torch.arange(groups) % 16
        scales = (torch.rand(groups, n, generator=g) * 0.01 + 0.001).half()
        w = ig.Int4Weight(ig.pack(codes), scales, zeros, k, group)
        w = ig.Int4Weight(
            **{f: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for f, v in vars(w).items()}
        )
        for scale in (3000.0, 1e-3):  # large: float16 partial sums stay finite
            x = (torch.randn(1, k, generator=g) * scale).to(DEVICE, torch.bfloat16)
            ref = F.linear(x.float(), ig.dequantize_reference(w)).to(torch.bfloat16)
            config = {**ig.config_for(1), "BLOCK_K": 128, "GEMV": choice}
            close(ig.int4_gemm(x, w, config=config), ref, tol=2e-2)


def test_config_classes_and_empty():
    assert ig.config_for(1)["BLOCK_M"] == 1 and ig.config_for(16)["BLOCK_M"] == 16
    assert ig.config_for(17)["BLOCK_M"] == 64 and ig.config_for(5000)["BLOCK_M"] == 128
    weight, _ = quantized_weight(16, 128, 128)
    y = ig.int4_gemm(torch.zeros(0, 128, device=DEVICE), weight)
    assert y.shape == (0, 16)


@pytest.mark.skipif(CUDA, reason="on a GPU the cuda tests below run the kernels")
def test_kernels_compile_for_hopper():
    """The CUDA path is real without a GPU here: each class's kernel compiles for sm_90 (Triton's LLVM and
    ptxas), the GEMV's code loads are 16-byte vectors (4 per thread per step), the tensor-core kernels
    stream their tiles through cp.async within the H100's 227 KB of shared memory, and no code goes
    through an int-to-float conversion (a quarter of the FMA rate: 7e9 codes would take ~1.9 ms). The
    half2 GEMV (the default) issues clearly fewer instructions per code in its K loop than the float32
    one: it makes two codes per 32-bit operation."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_for_hopper"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    kernels = {r["kernel"]: r for r in map(json.loads, out.stdout.splitlines())}
    gemvs = ("gemv", "gemv_split", "gemv_late", "gemv_float32", "gemv_float32_split")
    assert set(kernels) == {*gemvs, "gemm16", "gemm_large", "dequantize"}
    for name in gemvs:
        assert kernels[name]["v4_loads"] == 4, kernels[name]
        assert (kernels[name]["atomics"] > 0) == name.endswith("_split"), kernels[name]
    half2, float32 = kernels["gemv"], kernels["gemv_float32"]
    assert half2["ptx_per_code"] < 0.75 * float32["ptx_per_code"], (half2, float32)
    if "sass_per_code" in half2:
        assert half2["sass_per_code"] < 0.75 * float32["sass_per_code"], (half2, float32)
        assert kernels["gemv_late"]["sass_per_code"] < half2["sass_per_code"], kernels["gemv_late"]
    for name in ("gemm16", "gemm_large"):
        assert kernels[name]["cp_async"] > 0 and kernels[name]["shared"] <= 227 * 1024
    for name in (*gemvs, "gemm16", "gemm_large"):  # floats by bit operations
        assert kernels[name]["int_to_float"] == 0, kernels[name]


@cuda_only
@pytest.mark.parametrize(
    "N, K", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (4096, 7168)]
)
@pytest.mark.parametrize("M", [1, 4, 16, 200, 2048])
def test_int4_cuda_realistic(M, N, K):
    weight, deq = quantized_weight(N, K, 128)
    x, b, ref = check(M, weight, deq, torch.bfloat16)
    close(ig.int4_linear(x, weight, b), ref, tol=2e-2)


@cuda_only
@pytest.mark.parametrize(
    "N, K", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (4096, 7168)]
)
def test_int4_cuda_gemv_kernels(N, K, gemv):
    """Each GEMV kernel (M = 1) on the Llama-3-8B shapes, with and without the split of K."""
    weight, deq = quantized_weight(N, K, 128)
    check(1, weight, deq, torch.bfloat16)
    check(1, weight, deq, torch.float16, config={**ig.config_for(1), "SPLIT_K": 1})
