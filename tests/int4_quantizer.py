"""A round-to-nearest int4 quantizer for the tests: float weights -> the published AWQ and GPTQ tensors
(written from the formats' descriptions, independently of services/executor/quantization), the
dequantized weight they stand for, and tiny quantized HF checkpoints built from a float HF model.

Per group of input rows and output feature: scale = (max - min) / 15 over the group (min <= 0 <= max),
zero = round(-min / scale), code = clamp(round(w / scale) + zero, 0, 15); w_hat = (code - zero) * scale
with the scale rounded to fp16 first (what a checkpoint stores).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output feature AWQ_ORDER[i]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


@dataclasses.dataclass
class Quantized:
    codes: torch.Tensor  # int64 [K, N]
    zeros: torch.Tensor  # int64 [G, N]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    dequantized: torch.Tensor  # float32 [N, K] (the torch Linear layout)


def groups_of(k: int, group_size: int, act_order_seed: int | None = None) -> torch.Tensor:
    """The group of each input row: contiguous runs, or (act-order) runs of a random row order."""
    g = k if group_size == -1 else group_size
    runs = torch.arange(k) // g
    if act_order_seed is None:
        return runs.to(torch.int32)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(act_order_seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = runs.to(torch.int32)
    return g_idx


def quantize(w: torch.Tensor, g_idx: torch.Tensor, min_zero: int = 0) -> Quantized:
    """w [N, K] float; min_zero 1 keeps zeros >= 1 (GPTQ v1 stores zero - 1 in a nibble)."""
    wt = w.t().float()  # [K, N]
    n_groups = int(g_idx.max()) + 1
    codes = torch.empty(wt.shape, dtype=torch.int64)
    zeros = torch.empty(n_groups, wt.shape[1], dtype=torch.int64)
    scales = torch.empty(n_groups, wt.shape[1], dtype=torch.float16)
    for grp in range(n_groups):
        rows = (g_idx == grp).nonzero().flatten()
        part = wt[rows]
        lo, hi = part.min(0).values.clamp(max=0), part.max(0).values.clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-4).half()
        zero = torch.round(-lo / scale.float()).clamp(min_zero, 15)
        codes[rows] = torch.round(part / scale.float() + zero).clamp(0, 15).long()
        zeros[grp], scales[grp] = zero.long(), scale
    deq = (codes - zeros[g_idx.long()]).float() * scales.float()[g_idx.long()]
    return Quantized(codes, zeros, scales, g_idx, deq.t().contiguous())


def _words(nibble_values: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15, nibble i at bits 4 i -> int32 [...]."""
    shifts = torch.arange(0, 32, 4)
    words = (nibble_values.long() << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, N] -> int32 [R, N / 8] in AWQ's order."""
    rows, n = values.shape
    return _words(values.view(rows, n // 8, 8)[:, :, list(AWQ_ORDER)])


def awq_tensors(qz: Quantized) -> dict[str, torch.Tensor]:
    return {
        "qweight": awq_pack(qz.codes),
        "qzeros": awq_pack(qz.zeros),
        "scales": qz.scales,
    }


def gptq_tensors(qz: Quantized) -> dict[str, torch.Tensor]:
    """checkpoint_format gptq (v1): zeros stored minus one."""
    k, n = qz.codes.shape
    qweight = _words(qz.codes.view(k // 8, 8, n).transpose(1, 2))  # row 8 r + i at bits 4 i
    g = qz.zeros.shape[0]
    return {
        "qweight": qweight,
        "qzeros": _words((qz.zeros - 1).view(g, n // 8, 8)),
        "scales": qz.scales,
        "g_idx": qz.g_idx,
    }


def quantization_config(method: str, group_size: int, desc_act: bool = False) -> dict:
    if method == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
        }
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": False,
        "checkpoint_format": "gptq",
    }


def quantize_hf_model(
    hf: torch.nn.Module, folder: Path, method: str, group_size: int, desc_act: bool = False
) -> None:
    """Quantize hf's decoder linears into folder (config.json + model.safetensors) and replace hf's
    weights by their dequantized values, so that hf computes what the checkpoint stands for."""
    tensors = {}
    with torch.no_grad():
        for name, param in hf.state_dict().items():
            module = name.rsplit(".", 2)
            if len(module) == 3 and module[1] in LINEARS and module[2] == "weight":
                # one act order per input: q/k/v (and gate/up) share theirs, as GPTQ gives them
                seed = zlib.crc32(f"{module[0]}.{SHARED_INPUT.get(module[1], module[1])}".encode())
                k = param.shape[1]
                g_idx = groups_of(k, group_size, seed if desc_act else None)
                qz = quantize(param, g_idx, min_zero=1 if method == "gptq" else 0)
                packed = awq_tensors(qz) if method == "awq" else gptq_tensors(qz)
                prefix = name[: -len("weight")]
                tensors.update({prefix + key: value for key, value in packed.items()})
                param.copy_(qz.dequantized)
            else:
                tensors[name] = param.detach().clone().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = hf.config.to_dict()
    config["quantization_config"] = quantization_config(method, group_size, desc_act)
    (folder / "config.json").write_text(json.dumps(config))
