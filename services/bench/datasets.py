"""Synthetic prompts for `radixserve bench serving`, drawn as sglang.bench_serving draws them.

Lengths follow SGLang's random datasets: each prompt's input and output length is uniform in
[max(int(len * range_ratio), 1), len], both ends included (range_ratio 1.0: every request the same).

- random-ids: random token ids, sent as `input_ids`; needs no tokenizer, only the vocabulary size
  (for servers started with --skip-tokenizer-init).
- random: random token ids decoded to text with the model's HF tokenizer, then re-encoded and
  trimmed so that the text really is `prompt_len` tokens long (what the server will see, minus any
  BOS it adds).

Example:

    from radixserve.bench.datasets import random_ids_requests
    requests = random_ids_requests(num_prompts=8, input_len=512, output_len=256, range_ratio=0.5,
                                   vocab_size=49152, seed=1)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Low ids hold special, control and byte tokens in most vocabularies; random prompts skip them.
SAFE_FIRST_ID = 1000
TEXT_FIT_ATTEMPTS = 10


@dataclass
class BenchRequest:
    prompt: str | list[int]  # text, or token ids sent as input_ids
    prompt_len: int  # in tokens
    output_len: int  # max_new_tokens asked for
    images: list[str] = field(default_factory=list)  # data: URLs (the image dataset)
    lora_name: str | None = None  # the adapter it names (--lora-name)


def sample_lengths(
    full_len: int, range_ratio: float, count: int, rng: np.random.RandomState
) -> list[int]:
    """SGLang's formula: uniform in [max(int(full_len * range_ratio), 1), full_len]."""
    if full_len < 1:
        raise ValueError(f"lengths must be at least 1, got {full_len}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"range ratio must be in [0, 1], got {range_ratio}")
    low = max(int(full_len * range_ratio), 1)
    return [int(n) for n in rng.randint(low, full_len + 1, size=count)]


def safe_id_range(vocab_size: int) -> tuple[int, int]:
    """[low, high) of the ids random-ids prompts are drawn from."""
    if vocab_size < 2:
        raise ValueError(f"vocab size must be at least 2, got {vocab_size}")
    return min(SAFE_FIRST_ID, vocab_size // 10), vocab_size


def random_ids_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    rng = np.random.RandomState(seed)
    input_lens = sample_lengths(input_len, range_ratio, num_prompts, rng)
    output_lens = sample_lengths(output_len, range_ratio, num_prompts, rng)
    low, high = safe_id_range(vocab_size)
    return [
        BenchRequest([int(t) for t in rng.randint(low, high, size=n_in)], n_in, n_out)
        for n_in, n_out in zip(input_lens, output_lens)
    ]


def random_text_requests(
    num_prompts: int, input_len: int, output_len: int, range_ratio: float, tokenizer, seed: int
) -> list[BenchRequest]:
    """tokenizer: an HF tokenizer (anything with encode, decode, vocab_size, all_special_ids)."""
    rng = np.random.RandomState(seed)
    input_lens = sample_lengths(input_len, range_ratio, num_prompts, rng)
    output_lens = sample_lengths(output_len, range_ratio, num_prompts, rng)
    allowed = ordinary_token_ids(tokenizer)
    requests = []
    for n_in, n_out in zip(input_lens, output_lens):
        text, actual_len = text_of_length(tokenizer, n_in, allowed, rng)
        requests.append(BenchRequest(text, actual_len, n_out))
    return requests


def ordinary_token_ids(tokenizer) -> np.ndarray:
    special = set(tokenizer.all_special_ids or [])
    return np.array([t for t in range(tokenizer.vocab_size) if t not in special])


def text_of_length(
    tokenizer, target_len: int, allowed: np.ndarray, rng: np.random.RandomState
) -> tuple[str, int]:
    """Text of random tokens that re-encodes to target_len tokens (or as close as a few tries get)."""
    ids = [int(t) for t in rng.choice(allowed, size=target_len)]
    for _ in range(TEXT_FIT_ATTEMPTS):
        text = tokenizer.decode(ids)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == target_len:
            return text, target_len
        if len(encoded) > target_len:
            ids = encoded[:target_len]
        else:
            ids = encoded + [int(t) for t in rng.choice(allowed, size=target_len - len(encoded))]
    return text, len(encoded)
