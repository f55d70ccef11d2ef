"""Rotary position embedding (NeoX / HF rotate-half layout) with precomputed cos/sin tables.

Scaling types: default, linear, llama3, yarn (with its attention factor folded into the tables). Both the transformers-5 `rope_parameters` dict and the
older `rope_theta` + `rope_scaling` keys are read.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_settings(hf_config: dict) -> tuple[float, dict]:
    """(theta, scaling dict with a 'rope_type' key) from a raw config.json dict."""
    params = dict(hf_config.get("rope_parameters") or {})
    params.update(hf_config.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return float(theta), params


def _inv_freq(head_dim: int, theta: float, scaling: dict, max_positions: int) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling.get("original_max_position_embeddings", max_positions)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
    raise NotImplementedError(f"rope type {kind!r} is not supported")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(scaling: dict) -> float:
    """What the cos/sin tables are multiplied by: YaRN's attention factor (the config's, else
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, else mscale(factor));
    1 for the other types."""
    if scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, all_dim = (
        scaling["factor"],
        scaling.get("mscale"),
        scaling.get("mscale_all_dim"),
    )
    if mscale and all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim)
    return yarn_mscale(factor)


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN: interpolated (inv_freq / factor) below the low correction dim, extrapolated (as is)
    above the high one, a linear ramp between."""
    factor = scaling["factor"]
    old_len = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = correction_dim(scaling.get("beta_fast") or 32)
    high = correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict, dtype: torch.dtype
    ):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = _inv_freq(head_dim, theta, scaling, max_positions)
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        factor = rope_attention_factor(scaling)
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        self.register_buffer("cos_table", torch.cat((cos, cos), -1).to(dtype), persistent=False)
        # rotate_half(x) * sin == [x2 | x1] * [-sin | sin]: the sign lives in the table.
        self.register_buffer("sin_table", torch.cat((-sin, sin), -1).to(dtype), persistent=False)

    def prepare(self, positions: torch.Tensor) -> "RopeStep":
        """What every layer of one step uses to rotate its q and k (built once per step)."""
        return rope_step(self.cos_table, self.sin_table, positions)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tables [T, 1, head_dim] for the step (computed once, used by every layer)."""
        return _cos_sin(self.cos_table, self.sin_table, positions)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] rotated; returns a new contiguous tensor."""
        half = x.shape[-1] // 2
        return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), -1), sin)


class RopeStep:
    """One step's rotation: the [max_pos, head_dim] tables and the step's positions [T], which a kernel
    fusing the rotation into other work reads (kernels/rotary_kv_store.py), and `rotate` for the rest."""

    def __init__(self, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor):
        self.cos_table, self.sin_table, self.positions = cos_table, sin_table, positions

    def rotate(self, qk: torch.Tensor, num_q_heads: int) -> torch.Tensor:
        """qk [T, q_heads + k_heads, head_dim] (q heads first) rotated; may be in place."""
        raise NotImplementedError


class _TorchRope(RopeStep):
    def __init__(self, cos_table, sin_table, positions, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__(cos_table, sin_table, positions)
        self.cos, self.sin = cos, sin

    def rotate(self, qk, num_q_heads):
        return RotaryEmbedding.apply(qk, self.cos, self.sin)


class _TritonRope(RopeStep):
    def rotate(self, qk, num_q_heads):
        from radixserve.kernels.rotary import apply_rotary

        apply_rotary(
            qk[:, :num_q_heads], qk[:, num_q_heads:], self.cos_table, self.sin_table, self.positions
        )
        return qk


def rope_step(
    cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
) -> RopeStep:
    """The step's rotation over the [max_pos, head_dim] tables: a Triton kernel on CUDA, torch elsewhere
    (with the per-token tables [T, 1, head_dim] gathered once, for every layer)."""
    if positions.is_cuda:
        return _TritonRope(cos_table, sin_table, positions)
    return _TorchRope(cos_table, sin_table, positions, *_cos_sin(cos_table, sin_table, positions))


def _cos_sin(cos_table, sin_table, positions) -> tuple[torch.Tensor, torch.Tensor]:
    return cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
