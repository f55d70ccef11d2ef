"""The image inputs of a vision-language model's requests on the executor: each prompt's images,
embedded once when the request arrives (before any state changes, so a bad image fails the step
cleanly) and kept until the last prefill chunk that runs one of their placeholder positions; and, for
M-RoPE models, each request's prompt positions and delta for its lifetime.

Per step, `input_embeds` writes the image rows of every sequence into the token embeddings, and
`positions` gives an M-RoPE model its [3, T] positions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radixserve.common.multimodal import PromptImage, check_images
from radixserve.common.step import NewRequest, StepError


@dataclass
class _RequestImages:
    images: list[PromptImage] = field(default_factory=list)
    rows: list[torch.Tensor | None] = field(default_factory=list)  # None: within the cached prefix
    mrope: torch.Tensor | None = None  # [3, prompt length] on the device
    mrope_delta: int = 0

    @property
    def images_end(self) -> int:
        return max((i.end for i in self.images), default=0)


class ImageInputs:
    def __init__(self, model: torch.nn.Module, device: torch.device, context_length: int):
        self.model = model
        self.device = device
        self.context_length = context_length
        self.multimodal = bool(getattr(model, "is_multimodal", False))
        self.uses_mrope = bool(getattr(model, "uses_mrope", False))
        self.requests: dict[str, _RequestImages] = {}

    def prepare(self, new_requests: list[NewRequest]) -> dict[str, _RequestImages]:
        """Check and embed the images of a step's new requests; nothing is kept yet (`admit`).
        Raises StepError."""
        prepared: dict[str, _RequestImages] = {}
        for req in new_requests:
            if not req.images and not req.mrope_positions:
                continue
            rid = req.request_id
            if req.images and not self.multimodal:
                raise StepError(f"request {rid}: the model takes no images")
            prefix = len(req.prefix_slots)
            entry = _RequestImages(list(req.images), mrope_delta=req.mrope_position_delta)
            if req.mrope_positions:
                if len(req.mrope_positions) % 3:
                    raise StepError(f"request {rid}: mrope_positions is not 3 rows")
                entry.mrope = torch.tensor(req.mrope_positions, dtype=torch.int64).view(3, -1)
                entry.mrope = entry.mrope.to(self.device)
            # The executor sees the whole prompt's length only through mrope_positions.
            limit = entry.mrope.shape[1] if entry.mrope is not None else self.context_length
            if error := check_images(entry.images, limit):
                raise StepError(f"request {rid}: {error}")
            todo = [i for i in entry.images if i.end > prefix]
            try:
                rows = self.model.embed_images([i.tensors for i in todo]) if todo else []
            except (RuntimeError, ValueError, KeyError, IndexError) as e:
                raise StepError(f"request {rid}: its images could not be embedded: {e}") from e
            by_image = dict(zip(map(id, todo), rows))
            for image in entry.images:
                r = by_image.get(id(image))
                if r is not None and r.shape[0] != image.length:
                    raise StepError(
                        f"request {rid}: an image has {r.shape[0]} embedding rows for "
                        f"{image.length} placeholder tokens"
                    )
                entry.rows.append(r)
            prepared[rid] = entry
        return prepared

    def admit(self, prepared: dict[str, _RequestImages]) -> None:
        self.requests.update(prepared)

    def drop(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def reset(self) -> None:
        self.requests.clear()

    def input_embeds(
        self, input_ids: torch.Tensor, spans: list[tuple[str, int, int, int]]
    ) -> torch.Tensor | None:
        """The token embeddings of the batch with the image rows its sequences reach written in;
        None when no sequence of the batch runs an image position. Frees the rows of images whose
        prompt part is done."""
        writes = []
        for rid, start, first, n in spans:
            entry = self.requests.get(rid)
            if entry is None or not entry.images:
                continue
            for image, rows in zip(entry.images, entry.rows):
                lo, hi = max(image.offset, first), min(image.end, first + n)
                if lo < hi and rows is not None:
                    writes.append((start + lo - first, rows[lo - image.offset : hi - image.offset]))
            if first + n >= entry.images_end:  # the prompt is past its images
                entry.images, entry.rows = [], []
                if entry.mrope is None:
                    del self.requests[rid]
        if not writes:
            return None
        embeds = self.model.model.embed_tokens(input_ids)  # the language model's token embedding
        for at, rows in writes:
            embeds[at : at + rows.shape[0]] = rows.to(embeds.dtype)
        return embeds

    def positions(
        self, positions: torch.Tensor, spans: list[tuple[str, int, int, int]]
    ) -> torch.Tensor:
        """An M-RoPE model's [3, T] positions: a prompt token's from its request's mrope positions,
        any other token's sequence position + its request's delta in all three rows."""
        out = positions.unsqueeze(0).repeat(3, 1)
        for rid, start, first, n in spans:
            entry = self.requests.get(rid)
            if entry is None or entry.mrope is None:
                continue
            prompt_len = entry.mrope.shape[1]
            in_prompt = max(0, min(n, prompt_len - first))
            if in_prompt:
                out[:, start : start + in_prompt] = entry.mrope[:, first : first + in_prompt]
            if in_prompt < n:
                out[:, start + in_prompt : start + n] += entry.mrope_delta
        return out
