"""Embeddings in the gateway (--is-embedding): the scheduler's vectors, OpenAI's `dimensions` and encodings.

`dimensions` keeps the first N components and, since the kept part of a unit vector is shorter
than 1, L2-normalizes them again (what OpenAI does for its Matryoshka-trained models). It is
refused for models whose vectors are not normalized: no rule says what a shortened one would be.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from radixserve.v1 import scheduler_pb2
from radixserve.gateway.api.errors import bad_request

EMBEDDING_SERVER_ONLY = "this server serves embeddings (--is-embedding); use /v1/embeddings"
GENERATION_SERVER_ONLY = (
    "this server serves text generation; start it with --is-embedding to serve /v1/embeddings"
)


@dataclass
class EmbeddingBatch:
    vectors: np.ndarray  # [num_inputs, dimension] float32
    normalized: bool  # each vector has unit L2 norm
    prompt_tokens: int

    @classmethod
    def from_proto(cls, resp: scheduler_pb2.SchedulerEmbedResponse) -> "EmbeddingBatch":
        vectors = np.asarray(resp.embeddings, dtype=np.float32).reshape(-1, resp.dimension)
        return cls(vectors, resp.normalized, resp.prompt_tokens)

    def shortened(self, dimensions: int) -> "EmbeddingBatch":
        """The first `dimensions` components of each vector, normalized again."""
        size = self.vectors.shape[1]
        if dimensions > size:
            raise bad_request(
                f"dimensions must be at most {size} for this model (got {dimensions})",
                param="dimensions",
            )
        if dimensions == size:
            return self
        if not self.normalized:
            raise bad_request(
                "this model's embeddings are not normalized, so they cannot be shortened: "
                "leave dimensions out",
                param="dimensions",
            )
        kept = self.vectors[:, :dimensions]
        norms = np.linalg.norm(kept, axis=1, keepdims=True)
        return EmbeddingBatch(kept / np.maximum(norms, 1e-12), True, self.prompt_tokens)


def check_lengths(sequences: list[list[int]], context_length: int, param: str) -> None:
    """400 for an input that is empty or longer than the model takes (longer inputs are not truncated)."""
    for i, ids in enumerate(sequences):
        where = param if len(sequences) == 1 else f"{param}[{i}]"
        if not ids:
            raise bad_request(f"{where} is empty", param=param)
        if context_length and len(ids) > context_length:
            raise bad_request(
                f"This model's maximum context length is {context_length} tokens, however {where} has "
                f"{len(ids)} tokens. Please reduce the length of the input.",
                param=param,
                code="context_length_exceeded",
            )


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """float: a JSON list; base64: the little-endian float32 bytes, base64-encoded (as OpenAI sends them)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
