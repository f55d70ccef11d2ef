"""kernels/gguf_triton.py (GGUF block-quantized GEMM and dequantization) against gguf.quants.dequantize, the
published layouts' ground truth.

Weights: Q8_0 / Q4_0 / Q4_1 blocks are made by gguf.quants.quantize from random float weights; gguf 0.19
cannot quantize the K-quants (NotImplementedError), so their blocks are random bytes with finite scales
(random_qweight), which exercises every bit of the packed fields. Without a GPU the kernels run in the
Triton interpreter (TRITON_INTERPRET=1) at small K, with 16-row tiles of two blocks so that N and K leave a
masked tail; on CUDA (`-m cuda`) the Llama-3-8B shapes are added.

Tolerances: dequantization to float32 is bit-exact in the interpreter (the same float32 operations as
numpy); on the GPU within a float32 step of the largest weight (a * b + c becomes one FMA there). GEMMs: the shared
helper of tests/kernels/kernel_checks.py, float32 1e-5, half types 2e-2 of max|ref|: both sides sum in
float32 in another order and round once to x's dtype (the interpreter rounds to bf16 by truncation).
"""

import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from radixserve.kernels import gguf_triton as gt  # noqa: E402
from tests.kernels.kernel_checks import DEVICE, cuda_only  # noqa: E402
from tests.kernels.kernel_checks import close as elementwise_close  # noqa: E402

K_QUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)
# K: three blocks (a full two-block tile plus a masked tail) for the super-block types, seven for the others
K_OF = {t: 768 if t in K_QUANTS else 224 for t in gt.SUPPORTED}


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    elementwise_close(got, ref, tol=2e-2)


def qweight(n: int, k: int, qtype: T, seed: int = 0) -> torch.Tensor:
    """Raw GGUF rows uint8 [n, row bytes] on DEVICE: quantized random weights where gguf can quantize."""
    g = torch.Generator().manual_seed(seed)
    if qtype in K_QUANTS:
        return gt.random_qweight(n, k, qtype, generator=g, device=DEVICE)
    w = (torch.randn(n, k, generator=g) * k**-0.5).numpy()
    return torch.from_numpy(quantize(w, qtype)).to(DEVICE)


def test_supported_types_are_the_assignment():
    assert set(gt.SUPPORTED) == {T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K}


@pytest.mark.parametrize("qtype", gt.SUPPORTED, ids=lambda t: t.name)
def test_dequantize_bit_exact_vs_gguf(qtype):
    q = qweight(19, K_OF[qtype], qtype)
    want = gt.gguf_dequantize_ref(q, qtype).cpu()
    got = gt.gguf_dequantize(q, int(qtype), torch.float32)
    assert got.shape == want.shape == (19, K_OF[qtype])
    assert torch.equal(got.cpu(), want)
    close(gt.gguf_dequantize(q, qtype, torch.bfloat16), want.to(DEVICE, torch.bfloat16))


@pytest.mark.parametrize("M", [1, 3, 16, 40])
@pytest.mark.parametrize("qtype", gt.SUPPORTED, ids=lambda t: t.name)
def test_gguf_linear_vs_reference(qtype, M):
    N, K = 21, K_OF[qtype]
    q = qweight(N, K, qtype, seed=M)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(DEVICE, torch.bfloat16)
    bias = torch.randn(N, generator=g).to(DEVICE, torch.bfloat16) if M != 3 else None
    got = gt.gguf_linear(x, q, qtype, bias)
    assert got.shape == (M, N) and got.dtype == torch.bfloat16
    close(got, gt.gguf_linear_ref(x, q, qtype, bias))


@pytest.mark.parametrize("M", [1, 5])
def test_gguf_linear_float32_and_fp16_strided(M):
    q = qweight(13, 256, T.Q4_K, seed=3)
    g = torch.Generator().manual_seed(4)
    x32 = torch.randn(M, 256, generator=g).to(DEVICE)
    close(gt.gguf_linear(x32, q, T.Q4_K), gt.gguf_linear_ref(x32, q, T.Q4_K))
    big = torch.randn(2, M, 300, generator=g).to(DEVICE, torch.float16)
    x = big[..., 20:276]  # [2, M, 256], row stride 300
    got = gt.gguf_linear(x, q, T.Q4_K)
    assert got.shape == (2, M, 13)
    close(got, gt.gguf_linear_ref(x.reshape(-1, 256), q, T.Q4_K).view(2, M, 13))


@pytest.mark.parametrize("M, qtype", [(1, T.Q8_0), (5, T.Q4_1)], ids=["gemv-Q8_0", "dot-Q4_1"])
def test_gguf_linear_gpu_block_shapes(M, qtype):
    """The tiles autotuning picks from on the GPU, at K = one K step + one block (loop and tail)."""
    qk, plane = GGML_QUANT_SIZES[qtype][0], gt.PLANES[qtype][0]
    configs = gt.configs_for(M, qtype)
    for block_n, cols in sorted({(c.kwargs["BLOCK_N"], c.kwargs["PLANE_COLS"]) for c in configs}):
        N, K = block_n + 3, cols // plane * qk + qk
        q = qweight(N, K, qtype, seed=block_n + cols)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEVICE, torch.bfloat16)
        cfg = {"BLOCK_N": block_n, "PLANE_COLS": cols, "num_warps": 4, "num_stages": 2}
        close(gt.gguf_linear(x, q, qtype, config=cfg), gt.gguf_linear_ref(x, q, qtype))


def test_bad_inputs_and_empty():
    q = qweight(8, 64, T.Q8_0)
    x = torch.zeros(2, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="Q5_0"):
        gt.gguf_linear(x, q, T.Q5_0)
    with pytest.raises(ValueError, match="64"):
        gt.gguf_linear(x[:, :32], q, T.Q8_0)
    with pytest.raises(ValueError, match="34-byte blocks"):
        gt.gguf_dequantize(q[:, :40], T.Q8_0, torch.bfloat16)
    with pytest.raises(ValueError, match="uint8"):
        gt.gguf_dequantize(q.view(torch.int8), T.Q8_0, torch.bfloat16)
    with pytest.raises(ValueError, match="divisible by 256"):
        gt.random_qweight(2, 300, T.Q6_K)
    assert gt.gguf_linear(x[:0], q, T.Q8_0).shape == (0, 8)
    assert gt.gguf_dequantize(q[:0], T.Q8_0, torch.bfloat16).shape == (0, 64)


def test_random_qweight_scales_are_finite_and_small():
    for qtype in gt.SUPPORTED:
        k = 512
        w = gt.gguf_dequantize_ref(gt.random_qweight(4, k, qtype), qtype)
        assert w.shape == (4, k) and torch.isfinite(w).all()
        assert 0 < w.abs().max() < 16.0, qtype.name  # f16 fields < 1.5e-3, |scale * q| < 8192


@cuda_only
@pytest.mark.parametrize("N, K", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
@pytest.mark.parametrize("qtype", gt.SUPPORTED, ids=lambda t: t.name)
def test_gguf_cuda_llama3_8b_shapes(qtype, N, K):
    q = gt.random_qweight(N, K, qtype, generator=torch.Generator().manual_seed(0), device="cuda")
    rows = slice(
        0, 512
    )  # the numpy reference on a slice of rows: the whole 28672 x 4096 takes seconds
    w_ref = gt.gguf_dequantize_ref(q[rows], qtype)
    w = gt.gguf_dequantize(q, qtype, torch.float32)
    # the GPU contracts a * b + c into one FMA (numpy rounds twice): a float32 step of the largest term
    torch.testing.assert_close(w[rows], w_ref, rtol=0, atol=2**-22 * w_ref.abs().max().item())
    for M in (1, 4, 16, 64):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        close(gt.gguf_linear(x, q, qtype)[:, rows], gt.gguf_linear_ref(x, q[rows], qtype))


_COMPILE_SM90 = """
import json, os, subprocess, sys, tempfile
import triton
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from radixserve.kernels import gguf_triton as gt

qtype, m = GGMLQuantizationType(int(sys.argv[1])), int(sys.argv[2])
cfg = gt.configs_for(m, qtype)[0]
fn = gt._gguf_gemm_kernel
qk, bb = GGML_QUANT_SIZES[qtype]
sig = {"x_ptr": "*bf16", "wq_ptr": "*u8", "wh_ptr": "*fp16", "b_ptr": "*bf16", "y_ptr": "*bf16"}
sig.update({a: "i32" for a in ("M", "N", "stride_xm", "stride_ym", "M_BUCKET")})
const = dict(K=4096, QTYPE=int(qtype), QK=qk, BB=bb, PLANE=gt.PLANES[qtype][0], HAS_BIAS=True)
const.update(BLOCK_M=1 if m == 1 else 16, UPCAST=False, PRECISION="tf32", **cfg.kwargs)
sig.update({a: "constexpr" for a in const})
src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(a),): v for a, v in const.items()})
opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
cuobjdump = os.path.join(triton.__path__[0], "backends", "nvidia", "bin", "cuobjdump")
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(kernel.asm["cubin"])
    f.flush()
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                           text=True, check=True).stdout
print(json.dumps({"ptx": kernel.asm["ptx"], "usage": usage}))
"""


@pytest.mark.parametrize("M, qtype", [(1, T.Q5_K), (16, T.Q4_1)], ids=["gemv-Q5_K", "dot-Q4_1"])
def test_cuda_path_compiles_for_sm90_without_spills(M, qtype):
    """The CUDA path, not the interpreter's: compiled for sm_90 by Triton's bundled ptxas with the first
    config of its list (no GPU needed; in a subprocess, since TRITON_INTERPRET=1 replaces the compiler
    here): evict-first loads of the blocks, the dot path on the tensor cores, no stack (no spills)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_SM90, str(int(qtype)), str(M)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "L1::evict_first" in out["ptx"]
    assert ("mma.sync" in out["ptx"]) == (M > 1)
    assert "STACK:0" in out["usage"], out["usage"]
