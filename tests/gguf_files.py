"""GGUF files written by the tests with the gguf package: quantized tensors, a tiny Llama."""

from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
from safetensors.numpy import save_file

from radixserve.common.model_files import SOURCE_MARKER

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
    """uint8 [rows, row bytes] of float32 values [rows, k] (Q4_0 / Q4_1 / Q8_0 by the gguf package, the
    K-quants by quantize_k), F16/F32 as float."""
    if qtype == T.F32:
        return values.astype(np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    if qtype in K_QUANTS:
        return quantize_k(values, qtype)
    return gguf.quants.quantize(values.astype(np.float32), T(qtype))


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(*v.shape, 2)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def quantize_k(values: np.ndarray, qtype: int) -> np.ndarray:
    """uint8 [rows, row bytes] of float values [rows, k] (k a multiple of 256) as Q4_K / Q5_K / Q6_K
    blocks: a plain round-to-nearest quantizer of the tests' own (not llama.cpp's search for the best
    scales), enough to give a test model realistic weights. Q4_K / Q5_K: per sub-block of 32 a scale
    (max - min) / levels and a min, both as 6-bit multiples of the super-block's f16 d and dmin; Q6_K:
    per sub-block of 16 an int8 multiple of d for max|x| / 32."""
    rows, k = values.shape
    x = values.astype(np.float64).reshape(rows, k // 256, -1)  # [rows, super-blocks, 256]
    nsb = x.shape[1]
    if qtype == T.Q6_K:
        sub = x.reshape(rows, nsb, 16, 16)
        scale = np.abs(sub).max(-1) / 32  # w = d sc (q - 32), q - 32 in -32..31
        d = (np.abs(scale).max(-1) / 127).astype(np.float16).astype(np.float64)
        sc = np.clip(np.rint(_div(scale, d[..., None])), -128, 127)
        step = d[..., None] * sc
        q = np.clip(np.rint(_div(sub, step[..., None])) + 32, 0, 63).astype(np.uint8)
        q = q.reshape(rows, nsb, 2, 4, 32)  # [half, sub-block of 32 t, l]
        low = q & 0x0F
        ql = np.concatenate(
            [low[:, :, :, 0] | (low[:, :, :, 2] << 4), low[:, :, :, 1] | (low[:, :, :, 3] << 4)], -1
        )
        hi = q >> 4
        qh = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)
        blocks = [
            ql.reshape(rows, nsb, 128),
            qh.reshape(rows, nsb, 64),
            sc.astype(np.int8).view(np.uint8),
            _f16_bytes(d).reshape(rows, nsb, 2),
        ]
        return np.ascontiguousarray(np.concatenate(blocks, -1).reshape(rows, -1))
    levels = 15 if qtype == T.Q4_K else 31
    sub = x.reshape(rows, nsb, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)  # w = d sc q - dmin m with m >= 0
    scale = (sub.max(-1) - lo) / levels
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float64)
    dmin = (-lo.min(-1) / 63).astype(np.float16).astype(np.float64)
    sc = np.clip(np.rint(_div(scale, d[..., None])), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_div(-lo, dmin[..., None])), 0, 63).astype(np.uint8)
    step = d[..., None] * sc
    offset = (dmin[..., None] * m)[..., None]
    q = np.clip(np.rint(_div(sub + offset, np.broadcast_to(step[..., None], sub.shape))), 0, levels)
    q = q.astype(np.uint8)
    packed = np.empty((rows, nsb, 12), np.uint8)
    packed[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
    pairs = q.reshape(rows, nsb, 4, 2, 32)
    qs = ((pairs[:, :, :, 0] & 0x0F) | ((pairs[:, :, :, 1] & 0x0F) << 4)).reshape(rows, nsb, 128)
    blocks = [_f16_bytes(d), _f16_bytes(dmin), packed]
    if qtype == T.Q5_K:
        bits = (q >> 4) & 1  # [rows, nsb, 8 sub-blocks, 32]: bit j of byte l
        blocks.append((bits << np.arange(8, dtype=np.uint8)[:, None]).sum(2, dtype=np.uint8))
    blocks.append(qs)
    return np.ascontiguousarray(np.concatenate(blocks, -1).reshape(rows, -1))


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


def llama_config(
    hidden: int, inter: int, heads: int, kv_heads: int, layers: int, vocab: int
) -> dict:
    """The config.json of a tiny float32 Llama (untied head, eos 2) that the GGUF tests write."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "eos_token_id": 2,
        "dtype": "float32",
    }


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


# A Llama layer's linears in HF order: HF name -> GGUF name.
LLAMA_LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_llama_gguf(
    folder: pathlib.Path,
    config: dict,
    layer_types: list[dict[str, int]],
    blocks,
    rng: np.random.Generator,
    embed: tuple[int, float],
    head: int,
    name: str = "model.gguf",
) -> pathlib.Path:
    """folder as model_files makes it from a .gguf of a tiny Llama (config from llama_config): the .gguf
    (name), config.json, the dequantized weights under HF names (what --quantization unquant serves) and
    the marker naming the .gguf. layer_types[i]: GGUF linear name -> block type of layer i (all seven);
    blocks(shape, qtype, std): a tensor's raw blocks; embed: the token embedding's (type, std), head the
    LM head's type; rng draws the norms, between the tensors, in file order."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    kv = kv_heads * hidden // heads
    shapes = {
        "attn_q": (hidden, hidden),
        "attn_k": (kv, hidden),
        "attn_v": (kv, hidden),
        "attn_output": (hidden, hidden),
        "ffn_gate": (inter, hidden),
        "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
    }
    stored, hf = {}, {}

    def add(gguf_name, hf_name, shape, qtype, heads=None, std=0.05):
        raw = blocks(shape, qtype, std)
        hf[hf_name] = np.ascontiguousarray(dequantize(raw, qtype))
        stored[gguf_name] = (raw if heads is None else llama_cpp_permute(raw, heads), qtype)

    vocab = config["vocab_size"]
    add("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden), embed[0], std=embed[1])
    add("output.weight", "lm_head.weight", (vocab, hidden), head)
    stored["output_norm.weight"] = (np.ones(hidden, np.float32), T.F32)
    hf["model.norm.weight"] = stored["output_norm.weight"][0]
    for i, types in enumerate(layer_types):
        for hf_part, part in LLAMA_LINEARS.items():
            part_heads = {"attn_q": heads, "attn_k": kv_heads}.get(part)
            add(
                f"blk.{i}.{part}.weight",
                f"model.layers.{i}.{hf_part}.weight",
                shapes[part],
                types[part],
                part_heads,
            )
        for part, hf_part in (
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ):
            norm = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
            stored[f"blk.{i}.{part}.weight"] = (norm, T.F32)
            hf[f"model.layers.{i}.{hf_part}.weight"] = norm
    fields = {
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.block_count": len(layer_types),
    }
    gguf_file = write_gguf(folder / name, stored, fields)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(hf, str(folder / "model.safetensors"))
    (folder / SOURCE_MARKER).write_text(json.dumps({"gguf": str(gguf_file)}))
    return folder
