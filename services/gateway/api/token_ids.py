"""vLLM's return_token_ids: the prompt's and the output's token ids beside the text.

Not streamed: chat answers carry prompt_token_ids at the top and token_ids in each choice; completions carry
both in each choice. Streamed: each choice's new token ids ride on its next chunk (so none are lost when a
token adds no text), and its prompt ids on its first chunk (chat: at the top of the response's first).
"""

from __future__ import annotations

from collections.abc import AsyncIterator


class StreamedTokenIds:
    def __init__(self, enabled: bool, prompts: list[list[int]], prompt_in_choice: bool):
        self.enabled = enabled
        self.prompts = prompts  # by choice index
        self.prompt_in_choice = prompt_in_choice
        self.pending: list[list[int]] = [[] for _ in prompts]
        self.started: set[int] = set()

    def add(self, index: int, token_ids: list[int]) -> None:
        if self.enabled:
            self.pending[index] += token_ids

    def attach(self, chunk: dict) -> dict:
        """The chunk with its choices' pending token ids (and prompt ids where it is their first)."""
        if not self.enabled:
            return chunk
        for choice in chunk["choices"]:
            index = choice["index"]
            choice["token_ids"], self.pending[index] = self.pending[index], []
            if index not in self.started:
                self.started.add(index)
                if self.prompt_in_choice:
                    choice["prompt_token_ids"] = self.prompts[index]
                elif len(self.started) == 1:
                    chunk["prompt_token_ids"] = self.prompts[index]
        return chunk

    async def attached(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        """The chunks, each with attach applied (the events add ids before yielding their chunks)."""
        try:
            async for chunk in chunks:
                yield self.attach(chunk)
        finally:
            await chunks.aclose()
