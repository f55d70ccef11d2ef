"""/v1/classify (servers started with --is-embedding on a *ForSequenceClassification model).

The executor answers each input's raw label scores as its embedding vector; here they become
probabilities (softmax over the labels; a single-label model's score goes through a sigmoid, as
HF's text-classification pipeline does) and the most likely label's name. The names come from
the model folder's config.json `id2label`, read where the scheduler says the folder is; a
gateway that cannot read it (another host) names them LABEL_0, LABEL_1, ... as HF does by default.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np

from radixserve.common.pooling_models import SEQUENCE_CLASSIFIER_SUFFIX, is_sequence_classifier
from radixserve.gateway.api.errors import bad_request
from radixserve.gateway.pipeline.generation import ServedModel

CLASSIFY_NEEDS_EMBEDDING_SERVER = (
    "this server serves text generation; /v1/classify needs a "
    f"*{SEQUENCE_CLASSIFIER_SUFFIX} model started with --is-embedding"
)


def check_classifier(is_embedding: bool, info: ServedModel | None) -> None:
    """400 unless the server serves a sequence classifier (info: None on a generation server)."""
    if not is_embedding or info is None:
        raise bad_request(CLASSIFY_NEEDS_EMBEDDING_SERVER)
    if not is_sequence_classifier(info.architecture):
        raise bad_request(
            f"this model ({info.architecture}) has no classification head "
            f"(*{SEQUENCE_CLASSIFIER_SUFFIX}): use /v1/embeddings"
        )


def probabilities(scores: np.ndarray) -> np.ndarray:
    """[N, num_labels] raw scores -> probabilities, float64."""
    scores = scores.astype(np.float64)
    if scores.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-scores))
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=4)
def class_labels(model_path: str, num_classes: int) -> tuple[str, ...]:
    """Each label's name: config.json's id2label where readable, else LABEL_i."""
    names = {}
    try:
        config = json.loads((pathlib.Path(model_path) / "config.json").read_text())
        names = {int(i): str(name) for i, name in (config.get("id2label") or {}).items()}
    except (OSError, ValueError, AttributeError):
        pass
    return tuple(names.get(i, f"LABEL_{i}") for i in range(num_classes))


def classification_data(scores: np.ndarray, labels: tuple[str, ...]) -> list[dict]:
    """The `data` list of a /v1/classify response."""
    probs = probabilities(scores)
    return [
        {
            "index": i,
            "label": labels[int(p.argmax())],
            "probs": p.tolist(),
            "num_classes": len(p),
        }
        for i, p in enumerate(probs)
    ]
