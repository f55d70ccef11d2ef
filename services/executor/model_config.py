"""What the executor needs from an HF model folder: config.json, generation_config.json, dtype."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import torch

_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(requested: str, hf_config: dict) -> torch.dtype:
    """--dtype auto means the config's dtype (float32 when the config names none)."""
    if requested != "auto":
        if requested not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {requested!r}; choose from {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[requested]
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return _DTYPE_NAMES.get(str(name).removeprefix("torch."), torch.float32)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# Config keys some architectures spell otherwise (DBRX), a dotted name being a key of a nested dict ->
# the name the executor reads; ModelConfig.load adds the standard key where the config lacks it.
_KEY_ALIASES = {
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_layers": "num_hidden_layers",
    "max_seq_len": "max_position_embeddings",
    "attn_config.kv_n_heads": "num_key_value_heads",
    "attn_config.rope_theta": "rope_theta",
}


def with_standard_keys(hf: dict) -> dict:
    """hf plus the standard names of the keys it spells otherwise (_KEY_ALIASES)."""
    out = dict(hf)
    for alias, key in _KEY_ALIASES.items():
        value = hf
        for part in alias.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None and out.get(key) is None:
            out[key] = value
    return out


# Keys of a vision-language config's text_config that describe the text config itself, not the model.
_TEXT_CONFIG_OWN_KEYS = frozenset(
    {"architectures", "model_type", "_name_or_path", "transformers_version"}
)


def with_text_config(hf: dict) -> dict:
    """A vision-language config (text_config and vision_config nested) with its text_config's keys
    lifted to the top, where the language model reads them; the rest (image_token_index,
    vision_config, architectures, ...) stays. Other configs unchanged."""
    text = hf.get("text_config")
    if not isinstance(text, dict) or "vision_config" not in hf:
        return hf
    lifted = {k: v for k, v in text.items() if v is not None and k not in _TEXT_CONFIG_OWN_KEYS}
    return {**hf, **with_standard_keys(lifted)}


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


@dataclass
class ModelConfig:
    path: pathlib.Path
    hf: dict  # config.json, plus the standard names of keys it spells otherwise (with_standard_keys)
    architecture: str
    dtype: torch.dtype
    context_length: int
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def load(
        cls, path: pathlib.Path, dtype: str = "auto", context_length: int | None = None
    ) -> "ModelConfig":
        path = pathlib.Path(path)
        hf = with_text_config(with_standard_keys(json.loads((path / "config.json").read_text())))
        architectures = hf.get("architectures") or []
        if not architectures:
            raise ValueError(f"{path}/config.json names no architecture")
        eos: list[int] = []
        gen_file = path / "generation_config.json"
        if gen_file.exists():
            eos = _as_id_list(json.loads(gen_file.read_text()).get("eos_token_id"))
        if not eos:
            eos = _as_id_list(hf.get("eos_token_id"))
        return cls(
            path=path,
            hf=hf,
            architecture=architectures[0],
            dtype=resolve_dtype(dtype, hf),
            # seq_length: ChatGLM's name for it
            context_length=context_length
            or int(hf.get("max_position_embeddings") or hf.get("seq_length") or 4096),
            eos_token_ids=eos,
        )

    def get(self, key: str, default=None):
        return self.hf.get(key, default)

    @property
    def num_layers(self) -> int:
        return self.hf.get("num_hidden_layers") or self.hf["num_layers"]  # num_layers: EXAONE

    @property
    def num_heads(self) -> int:
        return self.hf["num_attention_heads"]

    @property
    def num_kv_heads(self) -> int:
        return self.hf.get("num_key_value_heads") or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hf.get("head_dim") or self.hf["hidden_size"] // self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.hf["vocab_size"]
