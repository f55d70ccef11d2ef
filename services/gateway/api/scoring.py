"""SGLang's /v1/score, the pure part: each item's prompt (the query joined to it), and the label tokens'
probabilities at the position after that prompt (the route is in extension_routes.py)."""

from __future__ import annotations

import math

from radixserve.common.sampling import MAX_TOKEN_IDS_LOGPROB
from radixserve.gateway.api.errors import bad_request

MAX_SCORE_ITEMS = 128  # items one /v1/score request may score (one generation each)

Prompt = str | list[int]


def score_prompts(query: Prompt, items: str | list, item_first: bool) -> list[Prompt]:
    """One prompt per item: query + item (item + query with item_first), joined as text, or as token
    ids when both are ids (SGLang's rule: the two are the same kind)."""
    if isinstance(items, str):
        items = [items]
    if not items:
        raise bad_request("items must hold at least one item", param="items")
    if len(items) > MAX_SCORE_ITEMS:
        raise bad_request(
            f"items holds {len(items)} items, more than the {MAX_SCORE_ITEMS} one request may score",
            param="items",
            code="too_many_items",
        )
    text_query = isinstance(query, str)
    if any(isinstance(item, str) != text_query for item in items):
        raise bad_request("query and items must be of one kind: text, or token ids", param="items")
    if not text_query:
        query, items = list(query), [list(item) for item in items]
    return [item + query if item_first else query + item for item in items]


def check_labels(label_token_ids: list[int]) -> None:
    """The label count (the vocabulary is checked against the model by the route)."""
    if not label_token_ids:
        raise bad_request(
            "label_token_ids must name at least one token id", param="label_token_ids"
        )
    if len(label_token_ids) > MAX_TOKEN_IDS_LOGPROB:
        raise bad_request(
            f"label_token_ids may name at most {MAX_TOKEN_IDS_LOGPROB} token ids, got "
            f"{len(label_token_ids)}",
            param="label_token_ids",
            code="invalid_value",
        )


def label_scores(
    label_token_ids: list[int], logprobs: dict[int, float], apply_softmax: bool
) -> list[float]:
    """Each label's probability from its logprob (a label without one has probability 0); with
    apply_softmax renormalised over the labels (the softmax of their logprobs)."""
    values = [logprobs.get(t, -math.inf) for t in label_token_ids]
    if not apply_softmax:
        return [math.exp(v) for v in values]
    top = max(values)
    if top == -math.inf:
        return [0.0] * len(values)
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def score_response(model: str, scores: list[list[float]], prompt_tokens: int) -> dict:
    """SGLang's ScoringResponse; no token is returned, so completion_tokens is 0."""
    return {
        "scores": scores,
        "model": model,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 0,
            "total_tokens": prompt_tokens,
        },
        "object": "scoring",
    }
