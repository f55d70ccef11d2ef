"""Prompt logprobs in the scheduler core (sampling.prompt_logprob_start): each chunk asks the executor for
the right positions with the right next token, the prefix cache does not serve the wanted positions,
the logprobs reach the request's first event, and no KV leaks (the harness checks every step)."""

import pytest

from radixserve.common.sampling import SamplingParams
from tests.fake_executor import fake_prompt_logprob
from tests.scheduler.harness import Harness, OverlapHarness, reference_tokens


def wanting(start, top=0):
    return SamplingParams(prompt_logprob_start=start, prompt_top_logprobs_num=top)


def check_prompt_logprobs(h, rid, prompt, start, top=0):
    got = h.prompt_logprobs[rid]
    first = max(start, 1)
    assert [e.token_id for e in got] == prompt[first:]
    assert [e.logprob for e in got] == [
        pytest.approx(fake_prompt_logprob(t)) for t in prompt[first:]
    ]
    assert all(len(e.top) == top for e in got)


PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]


@pytest.mark.parametrize("start", [0, 1, 4, 10])
def test_whole_prefill_returns_the_prompt_tokens_from_start(start):
    h = Harness()
    h.add("a", PROMPT, max_new=3, sampling=wanting(start, top=2))
    h.run()
    check_prompt_logprobs(h, "a", PROMPT, start, top=2)
    assert h.outputs["a"] == reference_tokens(PROMPT, 3)
    first_events = [p for p in h.plans if p.new_requests]
    assert len(first_events) == 1


@pytest.mark.parametrize("harness", [Harness, OverlapHarness])
@pytest.mark.parametrize("chunk", [2, 3, 4, 10])
def test_chunked_prefill_asks_each_chunk_with_the_next_chunks_first_token(harness, chunk):
    h = harness(chunked_prefill_size=chunk, max_prefill_tokens=chunk)
    h.add("a", PROMPT, max_new=2, sampling=wanting(0))
    h.add("b", [5, 6, 7], max_new=2)
    h.run()
    check_prompt_logprobs(h, "a", PROMPT, 0)
    assert "b" not in h.prompt_logprobs or h.prompt_logprobs["b"] == []
    assert h.outputs["a"] == reference_tokens(PROMPT, 2)
    ranges = [
        r.prompt_logprobs
        for p in h.plans
        for r in p.new_requests + p.continuing_requests
        if r.request_id == "a" and r.prompt_logprobs is not None
    ]
    assert sum(r.count for r in ranges) == len(PROMPT) - 1
    assert all(r.next_token_id in PROMPT for r in ranges[:-1] if r.next_token_id != -1)


@pytest.mark.parametrize("page_size", [1, 4])
def test_prefix_cache_does_not_serve_wanted_positions(page_size):
    h = Harness(page_size=page_size)
    long_prompt = list(range(30, 60))
    h.add("warm", long_prompt, max_new=2)
    h.run()
    h.add("all", long_prompt, max_new=2, sampling=wanting(0, top=1))
    h.run()
    check_prompt_logprobs(h, "all", long_prompt, 0, top=1)
    assert h.finals["all"].cached_tokens == 0
    h.add("tail", long_prompt, max_new=2, sampling=wanting(20))
    h.run()
    check_prompt_logprobs(h, "tail", long_prompt, 20)
    # Prompt token 20's logprob comes from position 19: at most 19 tokens from the cache.
    assert 0 < h.finals["tail"].cached_tokens <= 19
    assert h.finals["tail"].cached_tokens == 19 - 19 % page_size
    h.add("plain", long_prompt, max_new=2)
    h.run()
    assert h.finals["plain"].cached_tokens > 19
    for rid in ("warm", "all", "tail", "plain"):
        assert h.outputs[rid] == reference_tokens(long_prompt, 2)
    assert h.sched.check_leak(deep=True) is None


def test_aborted_request_drops_its_prompt_logprobs_without_leaking():
    h = Harness(chunked_prefill_size=4, max_prefill_tokens=4)
    h.add("a", PROMPT, max_new=2, sampling=wanting(0))
    h.step()  # first chunk
    assert h.sched.abort("a") is not None
    h.run()
    assert h.prompt_logprobs["a"] == []
    assert h.sched.check_leak(deep=True) is None


@pytest.mark.parametrize("chunk", [-1, 5])
def test_retracted_requests_get_their_prompt_logprobs_once(chunk):
    prompts = [[7, 7, 7] + [100 + i] * 5 for i in range(6)]
    h = Harness(
        pool_size=48,
        schedule_conservativeness=0.0,
        min_new_token_ratio=0.0,
        chunked_prefill_size=chunk,
        max_prefill_tokens=5 if chunk > 0 else 4096,
    )
    for i, prompt in enumerate(prompts):
        h.add(f"r{i}", prompt, max_new=20, ignore_eos=True, sampling=wanting(0))
    h.run()
    assert h.sched.num_retractions > 0
    for i, prompt in enumerate(prompts):
        check_prompt_logprobs(h, f"r{i}", prompt, 0)
        assert h.outputs[f"r{i}"] == reference_tokens(prompt, 20)
