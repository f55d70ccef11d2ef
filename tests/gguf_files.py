"""GGUF files written by the tests with the gguf package: quantized tensors, a tiny Llama."""

from __future__ import annotations

import pathlib

import gguf
import numpy as np

T = gguf.GGMLQuantizationType
QUANTIZABLE = (T.Q4_0, T.Q4_1, T.Q8_0)  # gguf.quants.quantize implements these
K_QUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)  # only dequantize: the tests fill them with random valid blocks
# (byte offset of each f16 scale in a block, its value): scales small enough for a model's weights.
_K_SCALES = {T.Q4_K: ((0, 2e-3), (2, 1e-3)), T.Q5_K: ((0, 1e-3), (2, 5e-4)), T.Q6_K: ((208, 3e-5),)}


def gguf_cpu_extension():
    """The GGUF CPU kernels' extension (kernels/gguf_cpu.py), or skip the test where it cannot build."""
    import pytest

    from radixserve.kernels import gguf_cpu

    module = gguf_cpu.load()
    if module is None:
        pytest.skip("the GGUF CPU extension is unavailable on this machine")
    return module


def kernel_isas(module) -> list[int]:
    """The extension's kernels to test on this CPU: AVX2 (1), and AVX-512 VNNI (2) where present."""
    return [1, 2] if module.has_vnni() else [1]


def quantize(values: np.ndarray, qtype: int) -> np.ndarray:
    """uint8 [rows, row bytes] of float32 values [rows, k] (Q4_0 / Q4_1 / Q8_0), F16/F32 as float."""
    if qtype == T.F32:
        return values.astype(np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values.astype(np.float32), T(qtype))


def random_blocks(rows: int, k: int, qtype: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row bytes] of random K-quant blocks with small, finite scales."""
    values, nbytes = gguf.GGML_QUANT_SIZES[T(qtype)]
    blocks = rng.integers(0, 256, size=(rows, k // values, nbytes), dtype=np.uint8)
    for offset, scale in _K_SCALES[T(qtype)]:
        halves = (scale * rng.uniform(0.5, 1.0, size=(rows, k // values))).astype(np.float16)
        blocks[..., offset : offset + 2] = halves.view(np.uint8).reshape(rows, k // values, 2)
    return blocks.reshape(rows, -1)


def dequantize(raw: np.ndarray, qtype: int) -> np.ndarray:
    if qtype in (T.F32, T.F16):
        return raw.astype(np.float32)
    return gguf.quants.dequantize(raw, T(qtype)).astype(np.float32)


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives a Llama q/k projection (rope pairs interleaved)."""
    n = rows.shape[0]
    grouped = rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:])
    return grouped.swapaxes(1, 2).reshape(rows.shape)


def write_gguf(
    path: pathlib.Path, tensors: dict[str, tuple[np.ndarray, int]], fields: dict | None = None
) -> pathlib.Path:
    """A GGUF file of architecture llama with `tensors` (name -> (stored array, type)) and integer
    metadata `fields` (key -> value)."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in (fields or {}).items():
        writer.add_uint32(key, value)
    for name, (array, qtype) in tensors.items():
        raw_dtype = None if qtype in (T.F32, T.F16) else T(qtype)
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
