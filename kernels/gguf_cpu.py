"""y = x W^T with W kept in a GGUF file's quantized blocks, on the CPU (gguf_cpu.cpp: AVX2 + FMA, and
AVX-512 VNNI where the CPU has it; both kernels give the same bits).

`gguf_linear(x, qweight, qtype)` takes the weight as the file stores it: uint8 [N, K / block values *
block bytes], one row per output feature. Q4_0, Q4_1, Q8_0 and the K-quants Q4_K, Q5_K, Q6_K (so a
Q4_K_M or Q6_K file) run the C++ kernel (activations quantized to int8 per 32 values, int8 dot products,
a K-quant's 256-value super-block run as 8 blocks of 32 with its sub-block scales; see DEQUANTIZE_ROWS);
every other type, and every CPU where the extension does not build or run, dequantizes the weight per
call and multiplies in torch (`dequantize`). A model's weights of these types are loaded packed
(`pack`: rows interleaved 16 at a time, so one int8 dot-product instruction serves 16 rows and a
block's float work is done once per 16 rows); every function here takes either form, told apart by
the type (PACKED + the block type).

The extension is compiled at first use and cached like cpu_decode's (same build lock and stale-build
handling, RADIXSERVE_CPU_DECODE_BUILD_WAIT bounds waiting for another process's build);
RADIXSERVE_GGUF_CPU_KERNELS=0 keeps the torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from radixserve.kernels import cpu_decode

log = logging.getLogger("radixserve.kernels.gguf_cpu")

_SOURCE = pathlib.Path(__file__).with_name("gguf_cpu.cpp")
# The row-dot kernels, shared with cpu_decode.cpp (torch rebuilds on changes of the .cpp only).
KERNELS_HEADER = pathlib.Path(__file__).with_name("gguf_cpu_kernels.h")
ENV_SWITCH = "RADIXSERVE_GGUF_CPU_KERNELS"
_REQUIRED_FLAGS = {"avx2", "fma", "f16c"}
# No FMA contraction of scalar code: a row's result must not depend on which code path computed it.
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-DNDEBUG"]

# gguf.GGMLQuantizationType values (the gguf package is only imported where the other types need it).
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
Q4_K, Q5_K, Q6_K = 12, 13, 14
K_QUANT_TYPES = (Q4_K, Q5_K, Q6_K)  # super-blocks of 256 values: K a multiple of 256
FUSED_TYPES = (Q4_0, Q4_1, Q8_0, *K_QUANT_TYPES)  # the file's types the C++ kernels run
# A Q4_0 / Q4_1 / Q8_0 / K-quant weight's rows regrouped 16 at a time for the kernels (pack_rows) have the type
# PACKED + the block type: the same bytes per row, in another order (gguf_cpu_kernels.h, "Packed rows").
PACKED = 100
PACK_ROWS = 16
PACKABLE_TYPES = FUSED_TYPES  # every type the kernels run has a packed kernel
PACKED_TYPES = tuple(PACKED + q for q in PACKABLE_TYPES)
KERNEL_TYPES = FUSED_TYPES + PACKED_TYPES  # what gguf_linear / gguf_logits run in C++
PACK_SWITCH = "RADIXSERVE_GGUF_PACK"  # 0: keep the file's row order (for comparison)
FLOAT_TYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
BLOCK_VALUES = 32  # of Q4_0 / Q4_1 / Q8_0 (and the activations' int8 blocks)
# None: the fused types always take the int8 row dots, so a row's result does not depend on how many
# rows share its batch (greedy tokens must not change with a request's batch-mates). A row count here
# switches larger batches to a dequantize (C++) and a float32 GEMM: 0.84x the time at 32 rows, 0.5x at
# 512 (1536x576 Q4_1, one core), but float activations where the row dots quantize them to int8.
DEQUANTIZE_ROWS: int | None = None

_lock = threading.Lock()
_module = None
_tried = False


def cpu_supported() -> bool:
    return _REQUIRED_FLAGS <= cpu_decode._cpu_flags()


def _extension_name() -> str:
    key = hashlib.sha256(
        " ".join(
            [
                *sorted(cpu_decode._cpu_flags()),
                *_CFLAGS,
                _SOURCE.read_text(),
                KERNELS_HEADER.read_text(),
            ]
        ).encode()
    ).hexdigest()[:10]
    return f"radixserve_gguf_cpu_{key}"


def _build():
    from torch.utils import cpp_extension

    t0 = time.perf_counter()
    name = _extension_name()
    build_dir = cpu_decode._build_directory(name)
    build_dir.mkdir(parents=True, exist_ok=True)
    lock_path = build_dir.with_name(build_dir.name + ".lock")
    wait_s = cpu_decode._build_wait_s()
    fd = cpu_decode._acquire_build_lock(lock_path, time.monotonic() + wait_s)
    if fd is None:
        log.warning("another process has built the GGUF CPU kernels for over %gs", wait_s)
        return None
    try:
        torch_lock = build_dir / "lock"
        if torch_lock.exists():
            if not cpu_decode._stop_leftover_build(build_dir):
                return None
            torch_lock.unlink(missing_ok=True)
        path = cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            build_directory=str(build_dir),
            is_python_module=False,
            extra_cflags=_CFLAGS,
            verbose=False,
        )
    finally:
        os.close(fd)
    module = cpu_decode._import_library(path)
    log.info("GGUF CPU kernels ready in %.1fs", time.perf_counter() - t0)
    return module


def load():
    """The compiled extension, or None when unavailable (reason logged once)."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get(ENV_SWITCH, "1").lower() in ("0", "false", "no", "off"):
            log.info("GGUF CPU kernels disabled by %s; dequantizing per call", ENV_SWITCH)
        elif not cpu_supported():
            log.info("GGUF CPU kernels need AVX2, FMA and F16C; dequantizing per call")
        else:
            try:
                _module = _build()
            except Exception as e:  # compiler or ninja missing, build error, bad .so
                last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                log.warning(
                    "building the GGUF CPU kernels failed (%s: %s); dequantizing per call",
                    type(e).__name__,
                    last,
                )
        return _module


def reset_for_tests() -> None:
    global _module, _tried
    with _lock:
        _module, _tried = None, False


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of k values of qtype."""
    import gguf

    values, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    if k % values:
        raise ValueError(f"{k} values do not fill whole blocks of {values}")
    return k // values * nbytes


def base_type(qtype: int) -> int:
    """The file's block type of a (possibly packed) type."""
    return qtype - PACKED if qtype in PACKED_TYPES else qtype


def packing_enabled() -> bool:
    return os.environ.get(PACK_SWITCH, "1").lower() not in ("0", "false", "no", "off")


def pack(qtype: int, rows: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(type, rows) for the kernels: PACKABLE_TYPES' CPU rows whose count is a multiple of 16
    regrouped (pack_rows), when the extension runs and PACK_SWITCH allows; anything else as given."""
    if (
        qtype not in PACKABLE_TYPES
        or rows.dtype != torch.uint8
        or rows.device.type != "cpu"
        or rows.shape[0] % PACK_ROWS
        or not packing_enabled()
        or load() is None
    ):
        return qtype, rows
    return PACKED + qtype, pack_rows(rows, qtype)


def _q4_chunks(v: torch.Tensor) -> torch.Tensor:
    """Values [..., 16 rows, 32] (0..15) of a block as packed Q4 bytes [..., 4 chunks, 16 rows, 4]:
    chunk c, row j, byte t = value 8c + t | value 8c + 4 + t << 4."""
    v = v.reshape(*v.shape[:-1], 4, 2, 4)
    return (v[..., 0, :] | (v[..., 1, :] << 4)).transpose(-2, -3)


def _q4_values(chunks: torch.Tensor) -> torch.Tensor:
    """_q4_chunks undone: [..., 4, 16 rows, 4] bytes -> [..., 16 rows, 32] values."""
    nib = chunks.transpose(-2, -3)  # [..., rows, c, t]
    return torch.stack([nib & 0x0F, nib >> 4], dim=-2).reshape(*nib.shape[:-2], 32)


# Packed Q5_K: the bit of a byte holding the high bit of value 8c + t (c, 0) and of 8c + 4 + t (c, 1).
_Q5_K_BIT = (2 * torch.arange(4, dtype=torch.uint8)).reshape(4, 1, 1) + torch.tensor(
    [0, 1], dtype=torch.uint8
).reshape(2, 1)
_BIT_OF = torch.arange(8, dtype=torch.uint8)


def _q6_k_values(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks [..., 210] -> their 256 unsigned values (0..63) in order: half h of 128, quarter k of
    32, l: low 4 bits from ql[64 h + 32 (k % 2) + l] (k < 2 low nibble, else high), high 2 bits from
    qh[32 h + l] bits 2k, 2k + 1."""
    ql = blocks[..., :128].reshape(*blocks.shape[:-1], 2, 2, 32)
    qh = blocks[..., 128:192].reshape(*blocks.shape[:-1], 2, 1, 32)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=-2)  # [..., h, k, l]
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).reshape(4, 1)
    return (low | (((qh >> shifts) & 3) << 4)).reshape(*blocks.shape[:-1], 256)


def _q6_k_blocks(q: torch.Tensor) -> torch.Tensor:
    """_q6_k_values undone: values [..., 256] -> the bytes ql | qh [..., 192]."""
    v = q.reshape(*q.shape[:-1], 2, 4, 32)
    low = v & 0x0F
    ql = low[..., 0:2, :] | (low[..., 2:4, :] << 4)  # [..., h, 2, l]
    high = v >> 4
    qh = high[..., 0, :] | high[..., 1, :] << 2 | high[..., 2, :] << 4 | high[..., 3, :] << 6
    return torch.cat([ql.reshape(*q.shape[:-1], 128), qh.reshape(*q.shape[:-1], 64)], dim=-1)


def pack_rows(rows: torch.Tensor, qtype: int) -> torch.Tensor:
    """The file's rows (uint8 [N, row bytes] of a PACKABLE_TYPES type, N a multiple of 16) in the
    packed order, the same shape (gguf_cpu_kernels.h, "Packed rows"). Group g of 16 rows, block b: the
    16 rows' d (f16 each), Q4_1's 16 m, then the values so that 4 bytes (a 32-bit lane) hold 4 values of
    one row: Q8_0 chunk c (of 8), row j, byte t = value 4c + t; Q4 chunk c (of 4), row j, byte t = value
    8c + t | value 8c + 4 + t << 4. Q4_K per super-block: 16 d, 16 dmin, the 12 scale bytes as 12 x 16
    (byte t of row j at 16 t + j), then each sub-block of 32 as a Q4 block's chunks; Q5_K the same and
    a plane of high bits; Q6_K 16 d, its int8 scales as 16 x 16, the low nibbles as Q4 chunks and the
    high 2 bits in planes (the kernels' header has the bit positions)."""
    n, nbytes = rows.shape
    block = block_shape(qtype)[1]
    g, nb = n // PACK_ROWS, nbytes // block
    blocks = rows.reshape(g, PACK_ROWS, nb, block).permute(0, 2, 1, 3)  # [g, nb, 16 rows, block]
    if qtype == Q6_K:
        q = (
            _q6_k_values(blocks).reshape(g, nb, PACK_ROWS, 8, 32).transpose(2, 3)
        )  # [g, nb, 8, 16, 32]
        low = _q4_chunks(q & 0x0F)  # [g, nb, 8, 4, 16, 4]
        v = (q >> 4).reshape(g, nb, 8, PACK_ROWS, 4, 2, 4)  # chunk c, value 8c + t / 8c + 4 + t
        fields = v[..., 0, :] | (v[..., 1, :] << 2)  # [g, nb, 8, 16, c, t]
        high = (fields[..., 0::2, :] | (fields[..., 1::2, :] << 4)).transpose(
            3, 4
        )  # [.., 8, 2, 16, 4]
        heads = [blocks[..., 208:210], blocks[..., 192:208].transpose(2, 3)]
        values = torch.cat([low.reshape(g, nb, -1), high.reshape(g, nb, -1)], dim=-1)
    elif qtype in (Q4_K, Q5_K):
        start = 48 if qtype == Q5_K else 16
        qs = blocks[..., start:].reshape(
            g, nb, PACK_ROWS, 4, 32
        )  # sub-blocks 2i (low), 2i + 1 (high)
        subs = torch.stack([qs & 0x0F, qs >> 4], dim=-2).reshape(g, nb, PACK_ROWS, 8, 32)
        values = _q4_chunks(subs.transpose(2, 3)).reshape(g, nb, -1)  # [g, nb, 8, 4, 16, 4]
        heads = [blocks[..., 0:2], blocks[..., 2:4], blocks[..., 4:16].transpose(2, 3)]
        if qtype == Q5_K:  # sub-block s's high bits: bit s of bytes 16 + l
            qh = (
                blocks[..., 16:48].unsqueeze(-2) >> _BIT_OF.reshape(8, 1)
            ) & 1  # [g, nb, 16, s, l]
            v = qh.transpose(2, 3).reshape(
                g, nb, 8, PACK_ROWS, 4, 2, 4
            )  # chunk c, first / second, t
            bits = (v << _Q5_K_BIT).sum(dim=(-3, -2), dtype=torch.uint8)  # [g, nb, s, 16, t]
            values = torch.cat([values, bits.reshape(g, nb, -1)], dim=-1)
    elif qtype == Q8_0:
        values = blocks[..., 2:].reshape(g, nb, PACK_ROWS, 8, 4).transpose(2, 3)  # [g, nb, c, j, t]
        heads = [blocks[..., 0:2]]
    else:
        qs = blocks[..., 4 if qtype == Q4_1 else 2 :]
        values = _q4_chunks(torch.cat([qs & 0x0F, qs >> 4], dim=-1))  # [g, nb, c, j, t]
        heads = [blocks[..., 0:2]] + ([blocks[..., 2:4]] if qtype == Q4_1 else [])
    parts = [h.reshape(g, nb, -1) for h in heads] + [values.reshape(g, nb, -1)]
    return torch.cat(parts, dim=-1).reshape(n, nbytes).contiguous()


def unpack_rows(packed: torch.Tensor, qtype: int) -> torch.Tensor:
    """pack_rows undone: the file's rows of a packed weight."""
    n, nbytes = packed.shape
    block = block_shape(qtype)[1]
    g, nb = n // PACK_ROWS, nbytes // block
    groups = packed.reshape(g, nb, PACK_ROWS * block)

    def halves(start):  # 16 rows' f16 at start: [g, nb, 16, 2]
        return groups[..., start : start + 32].reshape(g, nb, PACK_ROWS, 2)

    if qtype == Q6_K:
        scales = groups[..., 32:288].reshape(g, nb, 16, PACK_ROWS).transpose(2, 3)
        low = _q4_values(
            groups[..., 288:2336].reshape(g, nb, 8, 4, PACK_ROWS, 4)
        )  # [g, nb, 8, 16, 32]
        high = (
            groups[..., 2336:].reshape(g, nb, 8, 2, PACK_ROWS, 4).transpose(3, 4)
        )  # [.., 16, 2, t]
        fields = torch.stack([high & 0x0F, high >> 4], dim=-2).reshape(g, nb, 8, PACK_ROWS, 4, 4)
        v = torch.stack([fields & 3, fields >> 2], dim=-2).reshape(g, nb, 8, PACK_ROWS, 32)
        q = (low | (v << 4)).transpose(2, 3).reshape(g, nb, PACK_ROWS, 256)
        blocks = torch.cat([_q6_k_blocks(q), scales, halves(0)], dim=-1)
    elif qtype in (Q4_K, Q5_K):
        scales = groups[..., 64:256].reshape(g, nb, 12, PACK_ROWS).transpose(2, 3)
        chunks = groups[..., 256:2304].reshape(g, nb, 8, 4, PACK_ROWS, 4)
        subs = _q4_values(chunks).transpose(2, 3).reshape(g, nb, PACK_ROWS, 4, 2, 32)
        qs = (subs[..., 0, :] | (subs[..., 1, :] << 4)).reshape(g, nb, PACK_ROWS, 128)
        parts = [halves(0), halves(32), scales]
        if qtype == Q5_K:  # back to bit s of bytes 16 + l
            bits = groups[..., 2304:].reshape(g, nb, 8, PACK_ROWS, 1, 1, 4)
            v = ((bits >> _Q5_K_BIT) & 1).reshape(g, nb, 8, PACK_ROWS, 32)  # [g, nb, s, rows, l]
            qh = (v << _BIT_OF.reshape(8, 1, 1)).sum(dim=2, dtype=torch.uint8)
            parts.append(qh)
        blocks = torch.cat([*parts, qs], dim=-1)
    elif qtype == Q8_0:
        values = groups[..., 32:].reshape(g, nb, 8, PACK_ROWS, 4).transpose(2, 3)
        blocks = torch.cat([halves(0), values.reshape(g, nb, PACK_ROWS, 32)], dim=-1)
    else:
        heads = [halves(0)] + ([halves(32)] if qtype == Q4_1 else [])
        v = _q4_values(groups[..., 32 * len(heads) :].reshape(g, nb, 4, PACK_ROWS, 4))
        values = v[..., :16] | (v[..., 16:] << 4)  # the file's byte i: value i | value i + 16 << 4
        blocks = torch.cat([*heads, values], dim=-1)  # [g, nb, 16 rows, block]
    return blocks.permute(0, 2, 1, 3).reshape(n, nbytes).contiguous()


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[..., start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()


# Types whose C++ dequantize (gguf_cpu.cpp) gives the torch formulas' bits: d * q (Q8_0) and d * q + m
# (Q4_1), one rounding per operation either way. (Q4_0's C++ computes d * q - 8 d, torch d * (q - 8).)
# The K-quants' C++ dequantize gives gguf.quants' bits (the reference dequantize_torch calls):
# (d sc) q - (dmin m), (d sc) (q - 32).
CPP_DEQUANTIZE_TYPES = (Q8_0, Q4_1, *K_QUANT_TYPES)


def dequantize(qweight: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """float32 [rows, k] of raw rows (uint8 [rows, row bytes]; or a float tensor for F32/F16/BF16), on
    qweight's device. Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K on the CPU in one C++ call when the extension
    runs (an embedding lookup's rows each step: one call, not ten torch ops), else Q4_0 / Q4_1 / Q8_0 in
    torch (the same bits); other types through gguf.quants on the CPU (the same bits for the K-quants)."""
    if qtype in FLOAT_TYPES:
        return qweight.float()
    if base_type(qtype) in CPP_DEQUANTIZE_TYPES and qweight.device.type == "cpu":
        module = load()
        if module is not None:
            return module.gguf_dequantize(qweight.contiguous(), qtype, k)
    return dequantize_torch(qweight, qtype, k)


def dequantize_rows(qweight: torch.Tensor, qtype: int, k: int, ids: torch.Tensor) -> torch.Tensor:
    """float32 [len(ids), k]: dequantize of the rows ids only (an embedding lookup), packed or not."""
    if qtype in FLOAT_TYPES:
        return qweight[ids].float()
    if base_type(qtype) in CPP_DEQUANTIZE_TYPES and qweight.device.type == "cpu":
        module = load()
        if module is not None:
            return module.gguf_dequantize_rows(qweight.contiguous(), qtype, k, ids.long())
    if qtype in PACKED_TYPES:
        qweight, qtype = unpack_rows(qweight, base_type(qtype)), base_type(qtype)
    return dequantize_torch(qweight[ids], qtype, k)


def block_shape(qtype: int) -> tuple[int, int]:
    """(values, bytes) of one block of a GGUF type, from the gguf package's table."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]


def type_names(qtypes) -> str:
    """`Q4_0, Q4_1 or Q8_0`: the GGUF names of block types."""
    import gguf

    names = [gguf.GGMLQuantizationType(q).name for q in qtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def dequantize_torch(qweight: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """dequantize without the C++ extension (any device)."""
    if qtype in FLOAT_TYPES:
        return qweight.float()
    if qtype in PACKED_TYPES:
        qweight, qtype = unpack_rows(qweight, base_type(qtype)), base_type(qtype)
    rows = qweight.shape[0]
    if qtype in (Q4_0, Q4_1, Q8_0):
        blocks = qweight.reshape(rows, -1, block_shape(qtype)[1])
        d = _halves(blocks, 0)
        if qtype == Q8_0:
            q = blocks[..., 2:].contiguous().view(torch.int8).float()
            return (d * q).reshape(rows, k)
        if qtype == Q4_1:
            return (d * _nibbles(blocks[..., 4:]) + _halves(blocks, 2)).reshape(rows, k)
        return (d * (_nibbles(blocks[..., 2:]) - 8.0)).reshape(rows, k)
    import gguf

    values = gguf.quants.dequantize(qweight.cpu().numpy(), gguf.GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(qweight.device)


def gguf_linear(
    x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] (any float dtype) @ W^T for W in GGUF blocks (uint8 [N, row bytes]); [M, N] in x's dtype."""
    k = x.shape[-1]
    if qtype in KERNEL_TYPES and x.device.type == "cpu":
        module = load()
        if module is not None:
            flat = x.reshape(-1, k).float().contiguous()
            if DEQUANTIZE_ROWS is not None and flat.shape[0] >= DEQUANTIZE_ROWS:
                y = F.linear(flat, module.gguf_dequantize(qweight, qtype, k))
            else:
                y = module.gguf_matmul(flat, qweight, qtype)
            y = y.reshape(*x.shape[:-1], qweight.shape[0])
            if bias is not None:
                y += bias
            return y.to(x.dtype)
    # On the CPU in float32 (bf16 GEMMs are slow without AVX512-BF16), elsewhere in x's dtype.
    dtype = torch.float32 if x.device.type == "cpu" else x.dtype
    w = dequantize(qweight, qtype, k).to(dtype)
    return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype)).to(x.dtype)


def gguf_logits(x: torch.Tensor, qweight: torch.Tensor, qtype: int) -> torch.Tensor | None:
    """An LM head's float32 logits [M, N] of bf16 rows x [M, K] in one C++ call: the same bits as
    gguf_linear(x, qweight, qtype).float() (the float32 product rounded to bf16, then widened), without
    the conversion passes and their temporaries, and without the GIL. None where the kernel does not
    run it (another block type, device or dtype, or no extension): the caller takes gguf_linear."""
    if qtype not in KERNEL_TYPES or x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return None
    module = load()
    if module is None:
        return None
    return module.gguf_logits(x.reshape(-1, x.shape[-1]).contiguous(), qweight, qtype)


def gguf_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference: dequantized by the gguf package, multiplied in float32."""
    import gguf

    if qtype in PACKED_TYPES:
        qweight, qtype = unpack_rows(qweight, base_type(qtype)), base_type(qtype)
    if qtype in FLOAT_TYPES:
        w = qweight.float()
    else:
        w = torch.from_numpy(
            np.ascontiguousarray(
                gguf.quants.dequantize(qweight.numpy(), gguf.GGMLQuantizationType(qtype)),
                dtype=np.float32,
            )
        )
    y = x.float() @ w.T
    return y if bias is None else y + bias.float()
