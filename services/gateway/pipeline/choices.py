"""Several choices from one API request: `n` samples of each prompt, and a list of prompts
(/v1/completions). Each choice is its own scheduler request (the radix cache shares the prompt's
KV between them); their streams are merged here, tagged with the choice index."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from radixserve.common.sampling import MAX_PROMPT_LOGPROB_VALUES, UINT64_MASK
from radixserve.gateway.api.errors import bad_request
from radixserve.gateway.pipeline.engine import Engine, collect
from radixserve.gateway.pipeline.generation import (
    Cancellation,
    Completion,
    Delta,
    Finish,
    PreparedRequest,
)


def fan_out(prepared: PreparedRequest, n: int, first_index: int = 0) -> list[PreparedRequest]:
    """n copies with their own request ids; a seeded request's copies get seeds seed+i, so the
    choices differ and the whole response stays reproducible."""
    if n == 1 and first_index == 0:
        return [prepared]
    copies = []
    for i in range(n):
        sampling = prepared.sampling
        if sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + i) & UINT64_MASK)
        copies.append(
            dataclasses.replace(
                prepared, request_id=f"{prepared.request_id}-{first_index + i}", sampling=sampling
            )
        )
    return copies


def check_prompt_logprob_total(requests: list[PreparedRequest]) -> None:
    """A 400 when the choices of one API request together ask for more than
    MAX_PROMPT_LOGPROB_VALUES prompt logprob values (each choice computes its prompt's)."""
    total = sum(r.sampling.prompt_logprob_values(len(r.input_ids)) for r in requests)
    if total > MAX_PROMPT_LOGPROB_VALUES:
        raise bad_request(
            f"the {len(requests)} choices would return {total} prompt logprob values, more than "
            f"the limit of {MAX_PROMPT_LOGPROB_VALUES}; ask for fewer choices, prompt positions "
            "or top alternatives",
            param="prompt_logprobs",
            code="invalid_value",
        )


async def complete_all(
    engine: Engine, requests: list[PreparedRequest], cancellation: Cancellation | None = None
) -> list[Completion]:
    """Run the requests (started together, see Engine.open_streams) to the end and collect them."""
    check_prompt_logprob_total(requests)
    streams = engine.open_streams(requests, cancellation=cancellation)
    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:  # those whose task never ran are aborted here
            stream.close()


async def merged_streams(
    engine: Engine, requests: list[PreparedRequest], cancellation: Cancellation | None = None
) -> AsyncIterator[tuple[int, Delta | Finish]]:
    """(choice index, item) from every request's stream as items arrive; an error in any choice
    ends the whole response; closing the iterator aborts the unfinished ones."""
    check_prompt_logprob_total(requests)
    streams = engine.open_streams(requests, cancellation=cancellation)
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item))
        except Exception as e:  # handed to the consumer, which raises it
            queue.put_nowait((index, e))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        unfinished = len(requests)
        while unfinished:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Finish):
                unfinished -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()
        await asyncio.gather(*tasks, return_exceptions=True)


def total_usage(finishes: list[Finish], n: int) -> Finish:
    """One usage for the choices of a response (n per prompt, grouped by prompt): each prompt
    counted once, every completion token."""
    firsts = finishes[::n]
    return Finish(
        reason="",
        matched=None,
        prompt_tokens=sum(f.prompt_tokens for f in firsts),
        completion_tokens=sum(f.completion_tokens for f in finishes),
        cached_tokens=sum(f.cached_tokens for f in firsts),
    )
