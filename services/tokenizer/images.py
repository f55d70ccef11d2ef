"""Images of a prompt, from encoded files to what the executor needs: decoded with pillow, processed
by the model's own HF processor (resize, anyres tiling, normalisation; its placeholder expansion
gives the true prompt length), split per image, and located in the prompt's token ids.

A Qwen2-VL-style (M-RoPE) model whose processor transformers cannot build (Qwen2VLProcessor needs
torchvision) takes its image processor alone, the placeholders expanded here (GridPlaceholderProcessor).
LLaVA-OneVision's processor, which transformers likewise builds only with torchvision (its video
processor), is built without a video processor (onevision_without_video): images need none.

A folder without a processor (no preprocessor_config.json / processor_config.json) has no image
inputs: a prompt with images is refused (ValueError, INVALID_ARGUMENT).
"""

from __future__ import annotations

import io
import json
import logging
import pathlib
import warnings

import torch
from PIL import Image

from radixserve.common.multimodal import ImageTensors, PromptImage, image_hash

log = logging.getLogger("radixserve.tokenizer")

NO_IMAGE_INPUTS = "this model takes no image inputs"
# Most pixels of one decoded image (width * height); larger ones are refused before decoding.
MAX_IMAGE_PIXELS = 50_000_000
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def decode_image(data: bytes, index: int) -> Image.Image:
    """The RGB picture of an encoded image file; ValueError when it is not one, or too large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{image.width}x{image.height} pixels, over {MAX_IMAGE_PIXELS}")
            image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning) as e:
        raise ValueError(f"image {index} could not be decoded: {e}") from e


def placeholder_runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of token_id in ids."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(ids):
        if ids[i] == token_id:
            j = i
            while j < len(ids) and ids[j] == token_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def _per_image(outputs: dict, count: int) -> list[ImageTensors]:
    """The processor's batched outputs split per image: pixel_values rows by image_grid_thw when it
    has one (patch rows of all images concatenated, as Qwen2-VL's), else along the first dimension."""
    pixels = outputs["pixel_values"]
    extras = {
        k: v
        for k, v in outputs.items()
        if k not in ("pixel_values", "input_ids", "attention_mask") and torch.is_tensor(v)
    }
    grid = extras.get("image_grid_thw")
    if grid is not None:
        sizes = grid.prod(dim=-1).tolist()
        chunks = list(pixels.split(sizes))
    else:
        chunks = [pixels[i : i + 1] for i in range(count)]
    return [
        ImageTensors(
            chunks[i].contiguous(), {k: v[i : i + 1].contiguous() for k, v in extras.items()}
        )
        for i in range(count)
    ]


class GridPlaceholderProcessor:
    """A Qwen2-VL-style processor made of the image processor alone, for when transformers cannot
    build the model's own processor (Qwen2VLProcessor needs torchvision for its video processor): the
    prompt tokenized, each single image token expanded to as many as the image's merged patch grid
    fills (qwen2_vl.image_token_count), as the model's processor does."""

    def __init__(self, folder: pathlib.Path, tokenizer, hf_config: dict, image_token_id: int):
        from transformers import AutoImageProcessor

        from radixserve.executor.models.qwen2_vl import image_token_count

        try:
            # transformers falls back to the pillow backend when torchvision is missing
            self.image_processor = AutoImageProcessor.from_pretrained(str(folder))
        except (AttributeError, ImportError, OSError, ValueError) as e:
            raise ValueError(
                f"the image processor of {folder} could not be loaded ({type(e).__name__}: {e})"
            ) from e
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.image_token_id = image_token_id
        self.token_count = image_token_count

    def __call__(self, text: list[str], images, return_tensors: str, add_special_tokens: bool):
        outputs = dict(self.image_processor(images=images, return_tensors=return_tensors))
        grids = [tuple(g) for g in outputs["image_grid_thw"].tolist()]
        ids = self.tokenizer(text[0], add_special_tokens=add_special_tokens)["input_ids"]
        at = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(at) != len(grids):
            raise ValueError(
                f"the prompt has {len(at)} image tokens for {len(grids)} images (one each)"
            )
        expanded: list[int] = []
        cursor = 0
        for i, grid in zip(at, grids):
            expanded += ids[cursor:i] + [self.image_token_id] * self.token_count(
                self.hf_config, grid
            )
            cursor = i + 1
        outputs["input_ids"] = torch.tensor([expanded + ids[cursor:]])
        return outputs


def _mrope_fn(hf_config: dict):
    """The M-RoPE position function of a Qwen2-VL-style model (None for others)."""
    text = hf_config.get("text_config") or hf_config
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    if "mrope_section" not in rope and "mrope_section" not in (hf_config.get("rope_scaling") or {}):
        return None
    try:
        from radixserve.executor.models.qwen2_vl import mrope_positions
    except ImportError:
        log.warning("M-RoPE model but no mrope_positions available: positions will be plain")
        return None
    return mrope_positions


def onevision_without_video(folder: pathlib.Path, tokenizer):
    """LlavaOnevisionProcessor from the folder's image processor, tokenizer and processor_config.json,
    with no video processor (the class checks for one, which needs torchvision)."""
    import inspect

    from transformers import AutoImageProcessor, LlavaOnevisionProcessor

    class ImagesOnly(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    config_file = folder / "processor_config.json"
    fields = json.loads(config_file.read_text()) if config_file.is_file() else {}
    accepted = set(inspect.signature(LlavaOnevisionProcessor.__init__).parameters) - {
        "self",
        "image_processor",
        "tokenizer",
        "video_processor",
        "kwargs",
    }
    return ImagesOnly(
        image_processor=AutoImageProcessor.from_pretrained(str(folder)),
        tokenizer=tokenizer,
        video_processor=None,
        **{k: v for k, v in fields.items() if k in accepted},
    )


class ImageProcessing:
    """The model's HF processor, when it has one."""

    def __init__(self, folder: pathlib.Path, tokenizer):
        self.folder = folder
        self.processor = None
        self.image_token_id: int | None = None
        self.hf_config: dict = {}
        config_file = folder / "config.json"
        if config_file.is_file():
            self.hf_config = json.loads(config_file.read_text())
        token = self.hf_config.get("image_token_index", self.hf_config.get("image_token_id"))
        if token is None or not any((folder / f).is_file() for f in _PROCESSOR_FILES):
            return
        from transformers import AutoProcessor

        self.image_token_id = int(token)
        self.mrope = _mrope_fn(self.hf_config)
        try:
            self.processor = AutoProcessor.from_pretrained(str(folder), tokenizer=tokenizer)
        except (AttributeError, ImportError, OSError, ValueError) as e:
            # e.g. LlavaOnevisionProcessor and Qwen2VLProcessor, which transformers builds only with
            # torchvision installed (their video processors)
            if self.hf_config.get("model_type") == "llava_onevision":
                log.info("%s: %s; LLaVA-OneVision's processor without a video processor", folder, e)
                self.processor = onevision_without_video(folder, tokenizer)
            elif self.mrope is None:
                raise ValueError(
                    f"the image processor of {folder} could not be loaded ({type(e).__name__}: "
                    f"{e}); some processors need torchvision"
                ) from e
            else:
                log.info("%s: %s; images through its image processor alone", folder, e)
        if self.mrope is not None and not hasattr(self.processor, "tokenizer"):
            self.processor = GridPlaceholderProcessor(
                folder, tokenizer, self.hf_config, self.image_token_id
            )

    @property
    def enabled(self) -> bool:
        return self.processor is not None

    def process(
        self, prompt: str, images: list[bytes], add_special_tokens: bool = False
    ) -> tuple[list[int], list[PromptImage], list[int], int]:
        """(token ids with each image's placeholder expanded, the images, M-RoPE positions flattened
        (empty: none), M-RoPE delta) of a prompt whose image placeholders the images fill in order."""
        if not self.enabled:
            raise ValueError(NO_IMAGE_INPUTS)
        pictures = [decode_image(data, i) for i, data in enumerate(images)]
        try:
            outputs = self.processor(
                text=[prompt],
                images=pictures,
                return_tensors="pt",
                add_special_tokens=add_special_tokens,
            )
        except (ValueError, TypeError, IndexError) as e:
            raise ValueError(f"the images do not fit the prompt: {e}") from e
        ids = outputs["input_ids"][0].tolist()
        runs = placeholder_runs(ids, self.image_token_id)
        if len(runs) != len(pictures):
            raise ValueError(
                f"the prompt has {len(runs)} separate image placeholders for {len(pictures)} images "
                "(adjacent placeholders need text between them)"
            )
        tensors = _per_image(dict(outputs), len(pictures))
        prompt_images = [
            PromptImage(t, offset, length, image_hash(t))
            for t, (offset, length) in zip(tensors, runs)
        ]
        mrope, delta = [], 0
        if self.mrope is not None:
            grid = [tuple(g) for g in outputs["image_grid_thw"].tolist()]
            positions, delta = self.mrope(self.hf_config, ids, grid)
            mrope = positions.reshape(-1).tolist()
        return ids, prompt_images, mrope, int(delta)
