"""The `image` dataset of `radixserve bench serving`, as SGLang's bench_serving makes it: each request is
a random text prompt (the `random` dataset's, --random-input-len tokens) and --image-count pictures of
random pixels (seeded, made with pillow) at --image-resolution, encoded as --image-format and sent as
`data:` base64 URLs (chat content parts, or /generate's image_data).

The text does not depend on the image count: --image-count 0 sends the same prompts without pictures,
so that the vision tower's share of a run can be measured side by side.

Random pixels do not compress: a PNG holds about 3 bytes a pixel (4k: 25 MB, over the server's default
--max-image-bytes of 20 MiB); JPEG is several times smaller.

Example:

    from radixserve.bench.images import image_requests, parse_resolution
    requests = image_requests(num_prompts=8, input_len=128, output_len=128, range_ratio=1.0,
                              tokenizer=tok, seed=1, image_count=1,
                              resolution=parse_resolution("720p"), image_format="jpeg")
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np

from radixserve.bench.datasets import BenchRequest, random_text_requests

IMAGE_FORMATS = ("png", "jpeg")
DEFAULT_RESOLUTION = "384x384"
# Named resolutions (width x height), as SGLang accepts them.
NAMED_RESOLUTIONS = {
    "360p": (640, 360),
    "480p": (854, 480),
    "720p": (1280, 720),
    "1080p": (1920, 1080),
    "1440p": (2560, 1440),
    "4k": (3840, 2160),
}
MAX_SIDE = 8192
IMAGE_SEED_OFFSET = 7919  # the pictures' generator is seeded apart from the text's


def parse_resolution(value: str) -> tuple[int, int]:
    """(width, height) of "WxH" or a name in NAMED_RESOLUTIONS; ValueError otherwise."""
    name = value.strip().lower()
    if name in NAMED_RESOLUTIONS:
        return NAMED_RESOLUTIONS[name]
    match = re.fullmatch(r"(\d+)x(\d+)", name)
    if not match:
        raise ValueError(
            f"image resolution must be WxH (e.g. 384x384) or one of "
            f"{', '.join(NAMED_RESOLUTIONS)}; got {value!r}"
        )
    width, height = int(match[1]), int(match[2])
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(f"image sides must be in [1, {MAX_SIDE}]; got {value!r}")
    return width, height


def random_image(
    rng: np.random.RandomState, resolution: tuple[int, int], image_format: str
) -> bytes:
    """A picture of random pixels, encoded."""
    from PIL import Image

    width, height = resolution
    pixels = rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format=image_format.upper())
    return out.getvalue()


def data_url(data: bytes, image_format: str) -> str:
    return f"data:image/{image_format};base64," + base64.b64encode(data).decode()


def image_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    tokenizer,
    seed: int,
    image_count: int,
    resolution: tuple[int, int],
    image_format: str,
) -> list[BenchRequest]:
    """The random dataset's requests, each with image_count new pictures (none alike)."""
    if image_count < 0:
        raise ValueError(f"image count must be at least 0, got {image_count}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    requests = random_text_requests(
        num_prompts=num_prompts,
        input_len=input_len,
        output_len=output_len,
        range_ratio=range_ratio,
        tokenizer=tokenizer,
        seed=seed,
    )
    rng = np.random.RandomState(seed + IMAGE_SEED_OFFSET)
    for request in requests:
        request.images = [
            data_url(random_image(rng, resolution, image_format), image_format)
            for _ in range(image_count)
        ]
    return requests


def chat_content(request: BenchRequest) -> str | list[dict]:
    """The user message's content: the pictures as image_url parts, then the text."""
    if not request.images:
        return request.prompt
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in request.images]
    return [*parts, {"type": "text", "text": request.prompt}]


def native_prompt(tokenizer, request: BenchRequest) -> str:
    """The text /generate gets: the user message rendered by the model's chat template, one image
    placeholder per picture (what the chat API would make of chat_content)."""
    content = request.prompt
    if request.images:
        content = [{"type": "image"} for _ in request.images]
        content.append({"type": "text", "text": request.prompt})
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
