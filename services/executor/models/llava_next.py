"""LLaVA-NeXT (anyres) and LLaVA-OneVision: LLaVA whose image is a base view plus a grid of crops at the
best-fitting grid resolution (the processor makes them); the crops' features are laid back out as one
feature map, the padding the processor added is cut off, OneVision scales a map larger than
`vision_aspect_ratio` allows down (bilinear), a learned `image_newline` row ends every feature-map row,
and the base view's features go first. An image the processor did not tile (one patch) is the base
view's features and one image_newline.

Each image is embedded alone, as a single-image prompt (the processor is called the same way, so
the placeholder counts agree): OneVision's multi-image mode (base views only) is not used.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from radixserve.common.multimodal import ImageTensors
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llava import LlavaForConditionalGeneration


def crop_grid(image_size: list[int], pinpoints: list, tile: int) -> tuple[int, int]:
    """(rows, columns) of crops the processor made of an image of image_size (height, width)."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(tuple(image_size), pinpoints)
    return math.ceil(height / tile), math.ceil(width / tile)


def unpad(features: torch.Tensor, image_size: list[int]) -> torch.Tensor:
    """features [C, H, W] of the padded square-ish grid without the rows or columns that show the
    processor's padding around an image of image_size (height, width)."""
    height, width = image_size
    rows, cols = features.shape[1:]
    if width / height > cols / rows:  # padded above and below
        kept = int(round(height * cols / width, 7))
        pad = (rows - kept) // 2
        return features[:, pad : rows - pad, :]
    kept = int(round(width * rows / height, 7))
    pad = (cols - kept) // 2
    return features[:, :, pad : cols - pad]


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.image_newline = nn.Parameter(torch.empty(config.get("hidden_size")))
        vision = config.get("vision_config")
        self.tile = vision["image_size"]
        self.side = vision["image_size"] // vision["patch_size"]  # feature rows of one crop
        self.pinpoints = config.get("image_grid_pinpoints")

    def shrink(self, grid: torch.Tensor) -> torch.Tensor:
        """NeXT keeps the unpadded map as it is (OneVision may scale it down)."""
        return grid

    def pack(self, features: torch.Tensor, image_size: list[int]) -> torch.Tensor:
        """One image's placeholder rows from its crops' features [crops, side*side, hidden]."""
        newline = self.image_newline.to(features.dtype)
        if features.shape[0] == 1:
            return torch.cat([features[0], newline[None]])
        base, crops = features[0], features[1:]
        rows, cols = crop_grid(image_size, self.pinpoints, self.tile)
        s = self.side
        # [rows, cols, s, s, hidden] -> one map [hidden, rows*s, cols*s]
        grid = (
            crops.view(rows, cols, s, s, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * s, cols * s)
        )
        grid = self.shrink(unpad(grid, image_size))
        hidden, height, width = grid.shape
        grid = torch.cat([grid, newline[:, None, None].expand(hidden, height, 1)], dim=2)
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)])

    def embed_images(self, images: list[ImageTensors]) -> list[torch.Tensor]:
        device = next(self.parameters()).device
        out = []
        for image in images:
            size = [int(v) for v in image.extras["image_sizes"].reshape(-1)[:2].tolist()]
            rows, cols = crop_grid(size, self.pinpoints, self.tile)
            pixels = image.pixel_values.to(device)
            pixels = pixels.reshape(-1, *pixels.shape[-3:])  # [crops (padded), 3, H, W]
            used = rows * cols + 1 if pixels.shape[0] > 1 else 1
            out.append(self.pack(self.image_features(pixels[:used]), size))
        return out


class LlavaOnevisionForConditionalGeneration(LlavaNextForConditionalGeneration):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        ratio = config.get("vision_aspect_ratio", "anyres_max_9")
        self.max_crops = int(ratio.removeprefix("anyres_max_"))

    def shrink(self, grid: torch.Tensor) -> torch.Tensor:
        """A map of over max_crops crops' worth of features scaled down to about that (bilinear)."""
        _, height, width = grid.shape
        ratio = math.sqrt(height * width / (self.max_crops * self.side**2))
        if ratio <= 1.1:
            return grid
        size = [int(height // ratio), int(width // ratio)]
        return nn.functional.interpolate(grid[None], size, mode="bilinear")[0]
