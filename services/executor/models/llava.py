"""LLaVA (1.5): a vision tower, a two-layer projector and one of our language models.

The vision tower is transformers' own module (CLIPVisionModel / SiglipVisionModel, built from the
config's vision_config; weights from the checkpoint); the feature selection (vision_feature_layer,
vision_feature_select_strategy) and the projector are ours. The language model is the registry's class
for text_config's model_type and knows nothing of images: the runner writes the rows `embed_images`
returns into the prompt's placeholder positions and passes them as `input_embeds`.

The interface a vision-language model offers the executor (vqwen's Qwen2-VL offers it too):
`is_multimodal = True`, `forward(input_ids, positions, input_embeds=None)`, `compute_logits`,
`embed_images(list[ImageTensors]) -> list[Tensor [placeholder tokens, hidden]]`, and the placeholder
token id in `config.get("image_token_index")` (or "image_token_id").
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from radixserve.common.multimodal import ImageTensors
from radixserve.executor.model_config import ModelConfig

# text_config model_type -> the language model's architecture in the registry
TEXT_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# Checkpoint name prefixes -> (part, prefix inside the part); transformers 5 writes the first three,
# older checkpoints (the llava-hf hub models) the last four.
_PREFIXES = (
    ("model.language_model.", "language_model", "model."),
    ("model.vision_tower.", "vision_tower", ""),
    ("model.multi_modal_projector.", "multi_modal_projector", ""),
    ("model.image_newline", "image_newline", "image_newline"),
    ("lm_head.", "language_model", "lm_head."),
    ("language_model.", "language_model", ""),
    ("vision_tower.", "vision_tower", ""),
    ("multi_modal_projector.", "multi_modal_projector", ""),
    ("image_newline", "image_newline", "image_newline"),
)


def split_checkpoint_name(name: str) -> tuple[str, str]:
    """(part, name inside it) of a LLaVA-family checkpoint tensor."""
    for prefix, part, inner in _PREFIXES:
        if name.startswith(prefix):
            return part, inner + name[len(prefix) :]
    raise KeyError(f"checkpoint tensor {name} belongs to no part of the model")


def text_model_class(config: ModelConfig) -> type[nn.Module]:
    from radixserve.executor.models.registry import get_model_class

    model_type = (config.get("text_config") or {}).get("model_type", "llama")
    if model_type not in TEXT_ARCHITECTURES:
        raise ValueError(
            f"{config.architecture}: language model {model_type!r} not supported; "
            f"supported: {sorted(TEXT_ARCHITECTURES)}"
        )
    return get_model_class(TEXT_ARCHITECTURES[model_type])


def build_vision_tower(config: ModelConfig) -> nn.Module:
    """transformers' vision model for the config's vision_config (CLIP, SigLIP), SDPA attention."""
    # Imported here: transformers' model code is only needed by vision-language models.
    from transformers import AutoConfig, AutoModel

    vision = dict(config.get("vision_config"))
    vision_config = AutoConfig.for_model(**vision)
    vision_config._attn_implementation = "sdpa"
    return AutoModel.from_config(vision_config, dtype=torch.get_default_dtype())


class LlavaProjector(nn.Module):
    """linear_1, the config's activation, linear_2 (HF's LlavaMultiModalProjector)."""

    def __init__(self, in_features: int, hidden: int, act: str, bias: bool):
        from transformers.activations import ACT2FN

        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(nn.Module):
    is_multimodal = True
    uses_mrope = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image_token_id = int(config.get("image_token_index", config.get("image_token_id")))
        self.language_model = text_model_class(config)(config)
        self.vision_tower = build_vision_tower(config)
        layer = config.get("vision_feature_layer", -2)
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self.select_strategy = config.get("vision_feature_select_strategy", "default")
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.select_strategy!r} unknown")
        vision_hidden = config.get("vision_config")["hidden_size"]
        self.multi_modal_projector = LlavaProjector(
            vision_hidden * len(self.feature_layers),
            config.get("hidden_size"),
            config.get("projector_hidden_act", "gelu"),
            bool(config.get("multimodal_projector_bias", True)),
        )

    # What the runner and the attention code read of a causal LM: the language model's.
    @property
    def model(self) -> nn.Module:
        return self.language_model.model

    @property
    def kv_head_dims(self):
        return getattr(self.language_model, "kv_head_dims", None) or (
            self.config.head_dim,
            self.config.head_dim,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.language_model(input_ids, positions, input_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projected features [images, patches, hidden] of a batch of same-sized images."""
        out = self.vision_tower(pixel_values.to(self._vision_dtype()), output_hidden_states=True)
        selected = [out.hidden_states[i] for i in self.feature_layers]
        if self.select_strategy == "default":  # drop the CLS token
            selected = [h[:, 1:] for h in selected]
        return self.multi_modal_projector(torch.cat(selected, dim=-1))

    def _vision_dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def embed_images(self, images: list[ImageTensors]) -> list[torch.Tensor]:
        """One [placeholder tokens, hidden] tensor per image."""
        device = next(self.parameters()).device
        return [self.image_features(i.pixel_values.to(device)).flatten(0, 1) for i in images]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        language: list[tuple[str, torch.Tensor]] = []
        own = dict(self.named_parameters())
        tower = dict(self.vision_tower.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            part, inner = split_checkpoint_name(name)
            if part == "language_model":
                language.append((inner, tensor))
                continue
            if part == "vision_tower" and inner not in tower and f"vision_model.{inner}" in tower:
                inner = f"vision_model.{inner}"
            full = inner if part == "image_newline" else f"{part}.{inner}"
            if full not in own:
                if part == "vision_tower":  # e.g. a SigLIP pooling head LLaVA never runs
                    continue
                raise KeyError(f"checkpoint tensor {name} has no matching parameter")
            with torch.no_grad():
                own[full].copy_(tensor)
            loaded.add(full)
        self.language_model.load_weights(language)
        missing = [
            n
            for n in own
            if not n.startswith("language_model.") and n not in loaded and ".head." not in n
        ]
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {sorted(missing)[:8]}")
