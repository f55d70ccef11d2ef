"""Image inputs as the services pass them on: the tensors the model's image processor made of one
image (ImageTensors), where its placeholder tokens sit in a prompt (PromptImage), and the one mapping
between these and the common.proto messages (TensorData, ImageTensors, PromptImage).

The tokenizer service makes them, the scheduler keys the prefix cache by their hashes
(`cache_key_ids`), the executor embeds them (a vision-language model's `embed_images`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from radixserve.v1 import common_pb2


@dataclass
class ImageTensors:
    """The vision tower's input for one image: pixel_values (leading dimension 1) and the processor's
    other outputs for that image (e.g. image_sizes [1, 2], image_grid_thw [1, 3])."""

    pixel_values: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PromptImage:
    """One image of a prompt: its tensors, and the `length` placeholder tokens from index `offset` of
    the prompt's token ids that its embedding rows replace."""

    tensors: ImageTensors
    offset: int
    length: int
    hash: int  # image_hash(tensors)

    @property
    def end(self) -> int:
        return self.offset + self.length


def tensor_to_proto(t: torch.Tensor) -> common_pb2.TensorData:
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8) if t.numel() else t
    return common_pb2.TensorData(
        dtype=str(t.dtype).removeprefix("torch."),
        shape=list(t.shape),
        data=raw.numpy().tobytes() if t.numel() else b"",
    )


def tensor_from_proto(msg: common_pb2.TensorData) -> torch.Tensor:
    dtype = getattr(torch, msg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {msg.dtype!r}")
    shape = list(msg.shape)
    numel = 1
    for s in shape:
        numel *= s
    size = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != numel * size:
        raise ValueError(
            f"tensor of shape {shape} and dtype {msg.dtype} needs {numel * size} bytes"
        )
    if not numel:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)


def image_tensors_to_proto(t: ImageTensors) -> common_pb2.ImageTensors:
    return common_pb2.ImageTensors(
        pixel_values=tensor_to_proto(t.pixel_values),
        extras={k: tensor_to_proto(v) for k, v in t.extras.items()},
    )


def image_tensors_from_proto(msg: common_pb2.ImageTensors) -> ImageTensors:
    return ImageTensors(
        tensor_from_proto(msg.pixel_values),
        {k: tensor_from_proto(v) for k, v in msg.extras.items()},
    )


def prompt_image_to_proto(image: PromptImage) -> common_pb2.PromptImage:
    return common_pb2.PromptImage(
        tensors=image_tensors_to_proto(image.tensors),
        offset=image.offset,
        length=image.length,
        hash=image.hash,
    )


def prompt_image_from_proto(msg: common_pb2.PromptImage) -> PromptImage:
    return PromptImage(image_tensors_from_proto(msg.tensors), msg.offset, msg.length, msg.hash)


def prompt_images_from_proto(msgs) -> list[PromptImage]:
    return [prompt_image_from_proto(m) for m in msgs]


def image_hash(t: ImageTensors) -> int:
    """A 64-bit hash of the image's tensors (pixels and extras: the same picture at another size is
    another image)."""
    h = hashlib.sha256()
    for name, tensor in [("pixel_values", t.pixel_values), *sorted(t.extras.items())]:
        msg = tensor_to_proto(tensor)
        h.update(f"{name}:{msg.dtype}:{list(msg.shape)}:".encode())
        h.update(msg.data)
    return int.from_bytes(h.digest()[:8], "little")


def check_images(images: list[PromptImage], prompt_len: int) -> str | None:
    """Why images cannot belong to a prompt of prompt_len tokens (None: they can): each run inside
    the prompt, in order, not overlapping."""
    end = 0
    for i, image in enumerate(images):
        if image.length < 1 or image.offset < end or image.end > prompt_len:
            return (
                f"image {i}: placeholder run [{image.offset}, {image.end}) is empty, out of order "
                f"or outside the {prompt_len}-token prompt"
            )
        end = image.end
    return None


# Placeholder positions of an image are keyed in the prefix cache by an id no token has: a negative
# number from its hash (token ids are >= 0).
_KEY_SPACE = 2**31 - 1


def cache_key_ids(input_ids: list[int], images: list[PromptImage]) -> list[int]:
    """input_ids with each image's placeholder run replaced by an id derived from the image's hash, so
    that the prefix cache matches a prompt's image positions only for the same image."""
    if not images:
        return input_ids
    key = list(input_ids)
    for image in images:
        pad = -1 - image.hash % _KEY_SPACE
        key[image.offset : image.end] = [pad] * image.length
    return key
