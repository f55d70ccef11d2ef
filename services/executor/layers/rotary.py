"""Rotary position embedding (NeoX / HF rotate-half layout) with precomputed cos/sin tables.

Scaling types: default, linear, llama3, longrope (Phi-3), yarn (DeepSeek; its attention factor folded
into the tables). Both the transformers-5 `rope_parameters` dict and the older `rope_theta` +
`rope_scaling` keys are read.

Every attention backend rotates the pairs (i, i + head_dim/2) of the whole head. Other layouts map onto
that at load time (`RotaryLayout`): partial rotary (only the first rotary_dim dims rotate) and
interleaved pairs (2j, 2j+1) become a permutation of the head dimension applied to the q and k
projection rows (and their biases and per-head norm weights), plus tables whose extra dims have
frequency 0 (cos 1, sin 0). q.k is unchanged when q and k are permuted alike; v is not touched.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
from torch import nn


def rope_settings(hf_config: dict) -> tuple[float, dict]:
    """(theta, scaling dict with a 'rope_type' key) from a raw config.json dict."""
    params = dict(hf_config.get("rope_parameters") or {})
    params.update(hf_config.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] == "longrope":
        # Phi-3 configs keep the original context length beside rope_scaling
        original = params.get("original_max_position_embeddings") or hf_config.get(
            "original_max_position_embeddings"
        )
        if not original:
            raise ValueError("longrope scaling needs original_max_position_embeddings")
        params["original_max_position_embeddings"] = original
        if params.get("factor") is None:
            params["factor"] = hf_config["max_position_embeddings"] / original
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
    if kind == "longrope":  # the short factors; positions past the original context: _longrope
        return inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float32)
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
    raise NotImplementedError(f"rope type {kind!r} is not supported")


def partial_rotary_dim(hf_config: dict, head_dim: int, default_factor: float = 1.0) -> int:
    """How many leading dims of a head rotate (config `partial_rotary_factor`, top level or in
    `rope_parameters`)."""
    params = hf_config.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
    return int(head_dim * (default_factor if factor is None else factor))


class RotaryLayout:
    """The checkpoint's rotary layout of one head: the first `rotary_dim` dims rotate, in pairs
    (j, j + rotary_dim/2), or (2j, 2j+1) when interleaved; the rest pass through.

    `perm` is the head-dimension permutation that puts pair j at (j, j + head_dim/2) and the
    passing dims after the rotated ones in each half: our head dim i holds the checkpoint's perm[i]."""

    def __init__(self, head_dim: int, rotary_dim: int, interleaved: bool):
        if rotary_dim % 2 or head_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary dim {rotary_dim} does not fit head dim {head_dim}")
        self.head_dim, self.rotary_dim, self.interleaved = head_dim, rotary_dim, interleaved
        pairs, rest = rotary_dim // 2, (head_dim - rotary_dim) // 2
        j = torch.arange(pairs)
        first, second = (2 * j, 2 * j + 1) if interleaved else (j, j + pairs)
        passing = torch.arange(rotary_dim, head_dim)
        self.perm = torch.cat((first, passing[:rest], second, passing[rest:]))
        self.identity = bool((self.perm == torch.arange(head_dim)).all())

    def permute_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A q or k projection's weight [heads * head_dim, ...] or bias, each head permuted."""
        if self.identity:
            return tensor
        shape = tensor.shape
        heads = tensor.reshape(-1, self.head_dim, *shape[1:])
        return heads[:, self.perm.to(tensor.device)].reshape(shape)

    def permute_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-head norm weight [..., head_dim], permuted."""
        return tensor if self.identity else tensor[..., self.perm.to(tensor.device)]

    def permute_checkpoint(
        self, weights: Iterable[tuple[str, torch.Tensor]], rows: tuple[str, ...], norms=()
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's (name, tensor)s with the heads of the q/k projections (names holding a
        `rows` fragment) and per-head q/k norm weights (a `norms` fragment) permuted."""
        for name, tensor in weights:
            if self.identity:
                pass
            elif any(f in name for f in rows):
                if not name.endswith((".weight", ".bias")) and tensor.numel() > 1:
                    raise NotImplementedError(
                        f"{name}: quantized q/k projections with a partial or interleaved rotary"
                        " are not supported"
                    )
                if tensor.numel() > 1:
                    tensor = self.permute_rows(tensor)
            elif any(f in name for f in norms):
                tensor = self.permute_last(tensor)
            yield name, tensor


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
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict,
        dtype: torch.dtype,
        rotary_dim: int | None = None,
    ):
        """rotary_dim < head_dim: the frequencies of a partial rotary over rotary_dim dims on the
        first rotary_dim/2 pairs, frequency 0 on the others (the layout RotaryLayout loads)."""
        super().__init__()
        self.head_dim = head_dim
        rotary_dim = rotary_dim or head_dim
        inv_freq = _inv_freq(rotary_dim, theta, scaling, max_positions)
        inv_freq = torch.cat((inv_freq, inv_freq.new_zeros((head_dim - rotary_dim) // 2)))
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if scaling["rope_type"] == "longrope":
            cos, sin = _longrope(cos, sin, head_dim, theta, scaling)
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


def _longrope(cos, sin, head_dim: int, theta: float, scaling: dict):
    """LongRoPE's tables from the short-factor ones: the long factors from the original context length
    on, and cos and sin scaled by the attention factor."""
    original = scaling["original_max_position_embeddings"]
    long_inv_freq = _inv_freq(head_dim, theta, {"rope_type": "default"}, 0) / torch.tensor(
        scaling["long_factor"], dtype=torch.float32
    )
    angles = (
        torch.arange(original, cos.shape[0], dtype=torch.int64).float()[:, None] * long_inv_freq
    )
    cos[original:], sin[original:] = angles.cos(), angles.sin()
    factor = scaling["factor"]
    attention = scaling.get("attention_factor") or (
        math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    )
    return cos * attention, sin * attention


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


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal rotary (M-RoPE, Qwen2-VL): each token has three positions (temporal, height, width;
    all equal for text) and the head's frequency pairs are split in `mrope_section` runs: pair j of the
    first run rotates by the temporal position, of the second by the height, of the third by the width.

    A step's rotation is an ordinary one over per-token tables: the [T, head_dim] cos/sin rows mixed
    from the three positions, indexed by 0..T-1, so every backend (and the fused rotary + KV store
    kernel) applies it unchanged. Positions [T] (text only) rotate as the plain rotary does."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict,
        dtype: torch.dtype,
        mrope_section: list[int],
    ):
        super().__init__(head_dim, max_positions, theta, scaling, dtype)
        if len(mrope_section) != 3 or sum(mrope_section) != head_dim // 2:
            raise ValueError(
                f"mrope_section {mrope_section} must be 3 runs summing to head_dim/2 = {head_dim // 2}"
            )
        section = torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section))
        # which of the 3 position rows each table column reads (the two halves alike)
        self.register_buffer("section_rows", torch.cat((section, section)), persistent=False)
        self.register_buffer("columns", torch.arange(head_dim), persistent=False)

    def prepare(self, positions: torch.Tensor) -> RopeStep:
        """positions [3, T] (or [T]: text, all three alike)."""
        if positions.dim() == 1:
            return super().prepare(positions)
        cos, sin = self.mixed_tables(positions)
        return rope_step(cos, sin, torch.arange(cos.shape[0], device=positions.device))

    def mixed_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token tables [T, head_dim]: column c of token t is the table's at position
        positions[section_rows[c], t]."""
        if positions.dim() != 2 or positions.shape[0] != 3:
            raise ValueError(f"M-RoPE positions must be [3, T], got {list(positions.shape)}")
        rows = positions.index_select(0, self.section_rows).t()  # [T, head_dim]
        # (contiguous: the kernels read table rows with unit column stride)
        cos = self.cos_table[rows, self.columns].contiguous()
        return cos, self.sin_table[rows, self.columns].contiguous()
