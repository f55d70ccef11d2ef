"""Token states -> one vector per sequence, as the model folder says (--is-embedding).

A folder with a sentence-transformers `modules.json` is followed as sentence-transformers would:
its Pooling module's config picks the pooling modes (several are concatenated, in the config's
order), a Normalize module L2-normalizes, and the Transformer module's `sentence_bert_config.json`
gives max_seq_length. Any other module (Dense, LayerNorm, ...) is refused rather than skipped,
since leaving it out would change the vectors. Without `modules.json`: decoders pool the last
token and normalize (e5-mistral / gte-Qwen2 style), encoders take the mean of their tokens
(sentence-transformers' default for a plain HF encoder) without normalizing.

Every function takes right-padded hidden states [B, L, H] and a mask [B, L] (1 = real token).
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# sentence-transformers' legacy boolean keys, in the order it concatenates them.
LEGACY_MODE_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).max(dim=1).values


def _masked_sum(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1), weights.sum(dim=1).clamp(min=1e-9)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total, count = _masked_sum(hidden, mask)
    return total / count


def mean_sqrt_len_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total, count = _masked_sum(hidden, mask)
    return total / count.sqrt()


def weighted_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token i (from 1) weighs i: later tokens, which saw more of a causal model's input, count more."""
    positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
    weights = (mask.to(hidden.dtype) * positions).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    last = mask.long().sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLERS = {
    "cls": cls_pool,
    "max": max_pool,
    "mean": mean_pool,
    "mean_sqrt_len_tokens": mean_sqrt_len_pool,
    "weightedmean": weighted_mean_pool,
    "lasttoken": last_token_pool,
}


@dataclass(frozen=True)
class PoolingConfig:
    modes: tuple[str, ...]
    normalize: bool
    max_seq_length: int | None = None  # sentence-transformers' truncation length, when it sets one

    def __post_init__(self):
        unknown = [m for m in self.modes if m not in POOLERS]
        if unknown or not self.modes:
            raise ValueError(
                f"unsupported pooling modes {list(self.modes)}; supported: {sorted(POOLERS)}"
            )

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, H] states and [B, L] mask -> [B, H * len(modes)] float32 vectors."""
        hidden = hidden.float()
        vectors = torch.cat([POOLERS[m](hidden, mask) for m in self.modes], dim=-1)
        return F.normalize(vectors, p=2, dim=-1) if self.normalize else vectors

    @classmethod
    def from_folder(cls, folder: pathlib.Path, is_encoder: bool) -> "PoolingConfig":
        modules_file = folder / "modules.json"
        if not modules_file.is_file():
            return cls(("mean",), False) if is_encoder else cls(("lasttoken",), True)
        modes: tuple[str, ...] = ()
        normalize = False
        max_seq_length = None
        for module in json.loads(modules_file.read_text()):
            kind = module["type"].rsplit(".", 1)[-1]
            path = folder / module.get("path", "")
            if kind == "Transformer":
                max_seq_length = _max_seq_length(path)
            elif kind == "Pooling":
                modes = pooling_modes(json.loads((path / "config.json").read_text()))
            elif kind == "Normalize":
                normalize = True
            else:
                raise ValueError(
                    f"{modules_file}: sentence-transformers module {module['type']!r} is not supported"
                )
        if not modes:
            raise ValueError(f"{modules_file} lists no Pooling module")
        return cls(modes, normalize, max_seq_length)


def pooling_modes(pooling_config: dict) -> tuple[str, ...]:
    """The modes of a sentence-transformers Pooling config, new (`pooling_mode`) or legacy keys."""
    mode = pooling_config.get("pooling_mode")
    if mode is not None:
        return (mode,) if isinstance(mode, str) else tuple(mode)
    return tuple(name for key, name in LEGACY_MODE_KEYS.items() if pooling_config.get(key))


def _max_seq_length(transformer_dir: pathlib.Path) -> int | None:
    config = transformer_dir / "sentence_bert_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get("max_seq_length")
    return int(value) if value else None
