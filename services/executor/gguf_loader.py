"""A .gguf file's tensors under the model's (HF) parameter names, blocks kept as stored.

Each tensor comes as torch: quantized ones as uint8 [rows, row bytes] (the file's row layout), float ones
(norms, and any F32/F16/BF16 weight) as they are; `tensor.gguf_qtype` carries the file's type
(gguf.GGMLQuantizationType) for quantization/gguf.py. llama.cpp's converter permutes the rows of a
Llama model's q and k projections (its rope pairs neighbouring values, HF's rope the two halves of a
head); rows move whole, so the permutation is undone on the quantized rows themselves.
"""

from __future__ import annotations

import logging
import pathlib
import re
import struct
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

log = logging.getLogger("radixserve.executor.gguf_loader")

# GGUF name (after "blk.N.") -> HF name (after "model.layers.N.").
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
MODEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SKIPPED = {"rope_freqs"}  # llama3 rope factors: the model computes them from config.json
# Architectures whose converter permuted the q/k rows.
PERMUTED_ARCHITECTURES = {"llama"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None for one the model does not use."""
    match = _BLOCK.match(gguf_name)
    if match:
        layer, base, kind = match.groups()
        target = LAYER_NAMES.get(base)
        return None if target is None else f"model.layers.{layer}.{target}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    target = MODEL_NAMES.get(base)
    return None if target is None else f"{target}.{kind}"


def unpermute_rope_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo the converter's per-head row order (pairs interleaved) back to HF's (halves)."""
    n = rows.shape[0]
    grouped = rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:])
    return grouped.transpose(1, 2).reshape(rows.shape)


# GGUF metadata value types (the format's numbering) -> struct format; 8 string, 9 array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    qtype: int  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # rows first (the reverse of GGUF's ne order)
    offset: int  # from the start of the file


def read_header(path: pathlib.Path) -> tuple[dict, list[TensorInfo]]:
    """The scalar metadata and the tensor directory of a GGUF file (arrays such as the vocabulary are
    skipped, not decoded: gguf.GGUFReader decodes every token and takes tens of seconds here)."""
    data = memoryview(path.read_bytes() if path.stat().st_size < 1 << 20 else _mapped(path))
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(data[pos - n : pos]).decode("utf-8", errors="replace")

    def value(vtype: int):
        nonlocal pos
        if vtype in _SCALARS:
            return take(_SCALARS[vtype])
        if vtype == _STRING:
            return string()
        if vtype != _ARRAY:
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")
        etype, count = take("I"), take("Q")
        if etype in _SCALARS:
            pos += count * struct.calcsize("<" + _SCALARS[etype])
        else:
            for _ in range(count):
                value(etype)
        return None

    if bytes(data[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    pos = 4
    version, n_tensors, n_fields = take("I"), take("Q"), take("Q")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    fields = {}
    for _ in range(n_fields):
        key = string()
        fields[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = take("I")
        ne = [take("Q") for _ in range(dims)]
        qtype, offset = take("I"), take("Q")
        infos.append(TensorInfo(name, qtype, tuple(reversed(ne)), offset))
    alignment = fields.get("general.alignment") or 32
    start = (pos + alignment - 1) // alignment * alignment
    for info in infos:
        info.offset += start
    return fields, infos


def _mapped(path: pathlib.Path):
    return np.memmap(path, dtype=np.uint8, mode="r")


def read_tensor(mapped: np.ndarray, info: TensorInfo) -> torch.Tensor:
    """One tensor as torch: float types as their dtype, quantized ones as uint8 [rows, row bytes]."""
    import gguf

    qtype = gguf.GGMLQuantizationType(info.qtype)
    values, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    *rows, k = info.shape
    count = int(np.prod(rows, dtype=np.int64)) if rows else 1
    size = count * k // values * nbytes
    raw = np.array(mapped[info.offset : info.offset + size])
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
        return torch.from_numpy(raw.view(dtype).reshape(info.shape))
    if qtype == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(info.shape)
    return torch.from_numpy(raw.reshape(count, -1))


def iterate_gguf(path: pathlib.Path) -> Iterator[tuple[str, torch.Tensor]]:
    fields, infos = read_header(path)
    arch = fields.get("general.architecture")
    heads = fields.get(f"{arch}.attention.head_count")
    kv_heads = fields.get(f"{arch}.attention.head_count_kv") or heads
    permuted = arch in PERMUTED_ARCHITECTURES
    mapped = _mapped(path)
    for info in infos:
        name = hf_name(info.name)
        if name is None:
            if info.name.split(".")[0] not in SKIPPED:
                log.warning("GGUF tensor %s has no parameter; skipped", info.name)
            continue
        values = read_tensor(mapped, info)
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            values = unpermute_rope_rows(values, heads if "q_proj" in name else kv_heads)
        values.gguf_qtype = info.qtype
        yield name, values


def weight_types(path: pathlib.Path) -> list[int]:
    """The block types of the model's weight tensors in a .gguf (from its header alone)."""
    _, infos = read_header(path)
    return [info.qtype for info in infos if (hf_name(info.name) or "").endswith(".weight")]
