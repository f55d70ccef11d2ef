"""Prompt logprobs through the real scheduler (chunked prefill, radix cache, its Session to the gateway) over
the fake executor, whose prompt logprob of token t is fake_prompt_logprob(t): the gateway gets every
asked-for prompt token, in order, whether its prefix was cached or not, and nothing leaks."""

from __future__ import annotations

import pytest

from tests.fake_executor import fake_prompt_logprob
from tests.gateway.real_scheduler import gateway_stack, run

PROMPT = "The cat sat on the mat by the door."  # 35 tokens: 5 chunks of 8


def expected(start: int) -> list[list]:
    ids = [ord(c) for c in PROMPT]
    first = [[None, ids[0], None]] if start == 0 else []
    rest = [[pytest.approx(fake_prompt_logprob(t)), t, None] for t in ids[max(start, 1) :]]
    return first + rest


def test_chunked_and_cached_prompts_get_every_prompt_logprob(tmp_path):
    async def main():
        async with gateway_stack(tmp_path, chunked_prefill_size=8) as stack:

            async def generate(**fields) -> dict:
                body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 3}, **fields}
                r = await stack.client.post("/generate", json=body)
                assert r.status_code == 200, r.text
                return r.json()["meta_info"]

            first = await generate(return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
            assert first["input_token_logprobs"] == expected(0)
            assert all(len(top) == 2 for top in first["input_top_logprobs"][1:])
            assert first["cached_tokens"] == 0
            # The prompt is cached now: a plain request reuses it, one asking for logprobs from
            # token 20 on reuses at most its first 19 tokens.
            assert (await generate())["cached_tokens"] > 19
            tail = await generate(return_logprob=True, logprob_start_len=20)
            assert tail["input_token_logprobs"] == expected(20)
            assert 0 < tail["cached_tokens"] <= 19
            again = await generate(return_logprob=True, logprob_start_len=0)
            assert again["input_token_logprobs"] == expected(0)
            assert again["cached_tokens"] == 0

            r = await stack.client.post(
                "/v1/completions",
                json={"prompt": PROMPT, "max_tokens": 2, "echo": True, "logprobs": 1},
            )
            assert r.status_code == 200, r.text
            logprobs = r.json()["choices"][0]["logprobs"]
            assert logprobs["token_logprobs"][: len(PROMPT)] == [e[0] for e in expected(0)]
            assert logprobs["tokens"][: len(PROMPT)] == list(PROMPT)
            await stack.assert_idle_without_leaks()

    run(main())
