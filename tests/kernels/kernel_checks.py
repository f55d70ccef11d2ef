"""What the Triton kernel tests share: the device they run on, the dtypes, the tolerance of a kernel against
its torch reference (`close`, explained in test_kernels_triton_elementwise.py) and seeded random inputs."""

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
cuda_only = (
    pytest.mark.cuda
)  # realistic shapes: selected on a GPU machine (`-m cuda`), deselected in CPU CI


def close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> None:
    """fp32 to 1e-5; half types to tol relative to the largest reference value."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, (
        got.dtype,
        ref.dtype,
        got.shape,
        ref.shape,
    )
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    else:
        got, ref = got.float(), ref.float()
        torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item() + 1e-6, rtol=tol)


def exact_or_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-exact where fp32 -> dtype rounding is round-to-nearest-even (all but bf16 in the interpreter)."""
    if got.dtype == torch.bfloat16 and not CUDA:
        close(got, ref)
    else:
        assert torch.equal(got, ref)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)
