"""Prompt logprobs in the OpenAI / vLLM response shapes, with the text of each token looked up
(openai_format.py holds the pure formatting)."""

from __future__ import annotations

from radixserve.v1 import common_pb2
from radixserve.gateway.api import openai_format as fmt
from radixserve.gateway.pipeline.engine import Engine


async def completion_choice_logprobs(
    engine: Engine,
    prompt_ids: list[int],
    prompt_entries: list[common_pb2.TokenLogprob],
    entries: list[common_pb2.TokenLogprob],
    echo: str,
    top: int,
) -> dict:
    """A /v1/completions choice's logprobs: the echoed prompt's (when echo is not empty), then the
    completion's, whose text offsets start after the echo."""
    ids = fmt.logprob_token_ids(entries)
    if echo:
        ids += fmt.prompt_logprob_token_ids(prompt_ids, prompt_entries)
    texts = await engine.token_texts(ids)
    generated = fmt.completion_logprobs(entries, texts, len(echo))
    if not echo:
        return generated
    prompt = fmt.echo_logprobs(prompt_ids, prompt_entries, texts, top)
    return fmt.join_completion_logprobs(prompt, generated)


async def echo_chunk_logprobs(
    engine: Engine, prompt_ids: list[int], prompt_entries: list[common_pb2.TokenLogprob], top: int
) -> dict:
    """The logprobs of a streamed echo chunk."""
    texts = await engine.token_texts(fmt.prompt_logprob_token_ids(prompt_ids, prompt_entries))
    return fmt.echo_logprobs(prompt_ids, prompt_entries, texts, top)


async def vllm_prompt_logprobs(
    engine: Engine, prompt_entries: list[common_pb2.TokenLogprob], top: int
) -> list[dict | None]:
    texts = await engine.token_texts(fmt.logprob_token_ids(prompt_entries))
    return fmt.vllm_prompt_logprobs(prompt_entries, texts, top)
