"""Qwen2-VL and Qwen2.5-VL: transformers' vision tower (dynamic resolution) in front of our Qwen2 decoder,
which rotates q and k with M-RoPE (layers/rotary.py MRotaryEmbedding).

An image becomes t*h*w patches (the processor's pixel_values rows, image_grid_thw [t, h, w]); the tower
merges each spatial_merge_size^2 block of them into one embedding of the decoder's width, which replaces
one image placeholder token of the prompt. M-RoPE positions (`mrope_positions`): text tokens have three
equal positions counting on; an image's tokens have (start + t, start + row, start + column) on its
merged grid; the text after it continues from start + max(rows, columns). A token generated at sequence
position p has position p + delta in all three rows.

Both checkpoint layouts load: transformers 5's nested config (text_config, vision_config) and weight
names (model.language_model.*, model.visual.*, lm_head.*), and the older flat config with model.*,
visual.*, lm_head.* weights; transformers' config classes normalize the config.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Iterable, Protocol

import torch

from radixserve.executor.layers.rotary import MRotaryEmbedding, rope_settings
from radixserve.executor.model_config import ModelConfig, with_standard_keys
from radixserve.executor.models.llama import load_checkpoint_tensor
from radixserve.executor.models.qwen2 import Qwen2ForCausalLM

if TYPE_CHECKING:
    import transformers

DEFAULT_SPATIAL_MERGE_SIZE = 2  # transformers' default for both versions


class ImageInput(Protocol):
    """One image as the processor made it (services/common/multimodal.ImageTensors has this shape)."""

    pixel_values: torch.Tensor  # [t * h * w, channels * temporal_patch * patch * patch]
    extras: dict[str, torch.Tensor]  # "image_grid_thw": [1, 3] or [3]


def image_grid(image: ImageInput) -> tuple[int, int, int]:
    """The image's patch grid (t, h, w) from its extras["image_grid_thw"]."""
    grid = image.extras.get("image_grid_thw")
    if grid is None or grid.numel() != 3:
        raise ValueError("an image needs extras['image_grid_thw'] of 3 values (t, h, w)")
    t, h, w = (int(v) for v in grid.reshape(3).tolist())
    return t, h, w


def _spatial_merge_size(hf_config: dict) -> int:
    vision = hf_config.get("vision_config") or {}
    return int(vision.get("spatial_merge_size") or DEFAULT_SPATIAL_MERGE_SIZE)


def image_token_count(hf_config: dict, grid_thw: tuple[int, int, int]) -> int:
    """How many placeholder tokens an image of patch grid (t, h, w) fills in the prompt."""
    merge = _spatial_merge_size(hf_config)
    t, h, w = grid_thw
    if min(t, h, w) < 1 or h % merge or w % merge:
        raise ValueError(f"image grid {list(grid_thw)} is not whole {merge}x{merge} merge blocks")
    return t * (h // merge) * (w // merge)


def mrope_positions(
    hf_config: dict, input_ids: list[int], image_grid_thw: list[tuple[int, int, int]]
) -> tuple[torch.Tensor, int]:
    """The M-RoPE positions [3, T] (int64) of a whole prompt and its delta: a token later at sequence
    position p has position p + delta in all three rows.

    hf_config is config.json's dict (its image_token_id and vision_config.spatial_merge_size); each
    run of image_token_id in input_ids is taken by the next grid of image_grid_thw, in order, and must
    be exactly as long as that image's merged grid."""
    image_token = hf_config.get("image_token_id")
    merge = _spatial_merge_size(hf_config)
    ids = torch.as_tensor(input_ids, dtype=torch.int64)
    is_image = (
        ids == image_token if image_token is not None else torch.zeros_like(ids, dtype=torch.bool)
    )
    image_at = is_image.nonzero().flatten().tolist()
    expected = sum(image_token_count(hf_config, g) for g in image_grid_thw)
    if len(image_at) != expected:
        raise ValueError(
            f"the prompt has {len(image_at)} image tokens but its {len(image_grid_thw)} image(s) "
            f"fill {expected}"
        )
    pieces: list[torch.Tensor] = []
    cursor = 0  # next prompt index
    start = 0  # next position
    taken = 0  # image tokens taken by the images so far
    for grid in image_grid_thw:
        n = image_token_count(hf_config, grid)
        first = image_at[taken]
        if image_at[taken + n - 1] != first + n - 1:
            raise ValueError(
                f"the image at token {first} has fewer than its {n} image tokens in a row"
            )
        taken += n
        if first > cursor:  # text before the image
            pieces.append(torch.arange(start, start + first - cursor).expand(3, -1))
            start += first - cursor
        t, h, w = grid[0], grid[1] // merge, grid[2] // merge
        tt, hh, ww = torch.meshgrid(
            torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"
        )
        pieces.append(torch.stack((tt, hh, ww)).reshape(3, -1) + start)
        start += max(h, w)
        cursor = first + n
    if cursor < len(input_ids):
        pieces.append(torch.arange(start, start + len(input_ids) - cursor).expand(3, -1))
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.int64), 0
    positions = torch.cat(pieces, 1)
    return positions, int(positions.max()) + 1 - len(input_ids)


def language_model_config(
    config: ModelConfig, full: "transformers.PretrainedConfig"
) -> ModelConfig:
    """The decoder's ModelConfig: `full` (config.hf read by transformers' config class, which moves a
    flat config's text keys into text_config)'s text part, the rest of `config` kept."""
    text = {k: v for k, v in full.text_config.to_dict().items() if v is not None}
    text["tie_word_embeddings"] = bool(full.tie_word_embeddings)
    return ModelConfig(
        path=config.path,
        hf=with_standard_keys(text),
        architecture=config.architecture,
        dtype=config.dtype,
        context_length=config.context_length,
        eos_token_ids=list(config.eos_token_ids),
    )


class Qwen2VLForConditionalGeneration(Qwen2ForCausalLM):
    is_multimodal = True
    uses_mrope = True
    # transformers' config class and vision tower (module, class), imported when a model is built (the
    # executor does not import transformers otherwise)
    hf_config_class = "Qwen2VLConfig"
    vision_class = ("qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel")
    # transformers 5's names -> the older ones, which are ours (model.* the decoder, visual.* the tower)
    checkpoint_renames = {"model.language_model.": "model.", "model.visual.": "visual."}

    def __init__(self, config: ModelConfig):
        import transformers

        full = getattr(transformers, self.hf_config_class).from_dict(config.hf)
        text = language_model_config(config, full)
        super().__init__(text)
        self.full_config = config
        theta, scaling = rope_settings(text.hf)
        section = scaling.get("mrope_section")
        if not section:
            raise ValueError(f"{config.architecture}: the config has no rope mrope_section")
        self.rotary_emb = MRotaryEmbedding(
            text.head_dim,
            max(text.context_length, text.get("max_position_embeddings", 0)),
            theta,
            scaling,
            torch.get_default_dtype(),
            list(section),
        )
        vision_config = full.vision_config
        module, name = self.vision_class
        tower = getattr(importlib.import_module(f"transformers.models.{module}"), name)
        self.visual = tower._from_config(
            vision_config, dtype=torch.get_default_dtype(), attn_implementation="sdpa"
        ).eval()
        self.spatial_merge_size = int(vision_config.spatial_merge_size)

    @torch.no_grad()
    def embed_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Each image's embeddings [n_i, hidden] (n_i its merged grid's size, image_token_count), in
        one pass of the vision tower over all of them."""
        if not images:
            return []
        grids = [image_grid(image) for image in images]
        tower = self.visual
        weight = tower.patch_embed.proj.weight
        width = weight[0].numel()  # channels * temporal_patch * patch * patch
        for i, (image, (t, h, w)) in enumerate(zip(images, grids)):
            image_token_count(self.full_config.hf, (t, h, w))
            shape = tuple(image.pixel_values.shape)
            if shape != (t * h * w, width):
                raise ValueError(
                    f"image {i}: pixel_values {list(shape)} do not match its grid {[t, h, w]} "
                    f"({t * h * w} patches of {width} values)"
                )
        pixels = torch.cat([image.pixel_values for image in images]).to(weight.device, weight.dtype)
        grid_thw = torch.tensor(grids, dtype=torch.int64, device=weight.device)
        merged = tower(pixels, grid_thw=grid_thw).pooler_output
        sizes = [t * h * w // self.spatial_merge_size**2 for t, h, w in grids]
        return list(merged.split(sizes))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Qwen2's loading, with the vision tower's tensors (visual.*) loaded as they are into
        transformers' module (its q/k/v and gate/up are not the decoder's fused parameters)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            for old, new in self.checkpoint_renames.items():
                if name.startswith(old):
                    name = new + name[len(old) :]
            if "rotary_emb.inv_freq" in name or (
                self.tie_word_embeddings and name == "lm_head.weight"
            ):
                continue
            stacked = {} if name.startswith("visual.") else self.stacked_params
            loaded.add(load_checkpoint_tensor(params, stacked, name, tensor))
        missing = {n for n in params if n not in loaded}
        if self.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {sorted(missing)[:8]}")


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: the same decoder; its tower has windowed attention, RMSNorm and gated MLPs."""

    hf_config_class = "Qwen2_5_VLConfig"
    vision_class = ("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel")
