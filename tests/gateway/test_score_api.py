"""SGLang's /v1/score over the fake services (tests/gateway/fakes.py: one token per character; at every
output position the fake model gives "Y" the logprob -0.5, "N" -1.5 and any other asked token -4.0)."""

from __future__ import annotations

import math
import threading

import httpx
import pytest

from radixserve.common.sampling import MAX_TOKEN_IDS_LOGPROB
from radixserve.v1 import common_pb2, scheduler_pb2
from radixserve.gateway.api import scoring
from tests.gateway import fakes
from tests.gateway.fakes import (
    ASKED_LOGPROB,
    ASKED_LOGPROBS,
    MODEL,
    VOCAB_SIZE,
    FakeBackends,
    RunningGateway,
    encode,
    wait_until,
)

Y, N, A = ord("Y"), ord("N"), ord("A")
LABELS = [Y, N, A]
LOGPROBS = [ASKED_LOGPROBS[Y], ASKED_LOGPROBS[N], ASKED_LOGPROB]  # -0.5, -1.5, -4.0
PROBABILITIES = [math.exp(lp) for lp in LOGPROBS]
SOFTMAX = [p / sum(PROBABILITIES) for p in PROBABILITIES]


@pytest.fixture(scope="module")
def gw(backends):
    running = RunningGateway(backends)
    yield running
    running.close()


def post(gw, body: dict) -> httpx.Response:
    return httpx.post(gw.base_url + "/v1/score", json=body, timeout=30)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def error(response: httpx.Response, param: str | None, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["param"] == param, err
    return err


def scheduled(backends, prompt: list[int]) -> list:
    """The scheduler requests that had this prompt."""
    return [r for r in backends.scheduler.requests.values() if list(r.input_ids) == prompt]


def test_scores_are_the_label_probabilities_at_the_next_position(gw, backends):
    body = {"model": MODEL, "query": "Is it? ", "items": ["sky", "sea"], "label_token_ids": LABELS}
    answer = ok(post(gw, body))
    assert answer["scores"] == [pytest.approx(PROBABILITIES, rel=1e-12)] * 2
    prompt_tokens = len("Is it? sky") + len("Is it? sea")
    assert answer["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 0,
        "total_tokens": prompt_tokens,
    }
    assert answer["model"] == MODEL and answer["object"] == "scoring"
    for item in ("sky", "sea"):  # query + item; one greedy output position asking for the labels
        [request] = scheduled(backends, encode("Is it? " + item))
        assert request.stopping.max_new_tokens == 1
        assert request.sampling.temperature == 0
        assert list(request.sampling.token_ids_logprob) == LABELS


def test_apply_softmax_renormalises_over_the_labels(gw):
    body = {
        "query": "Q",
        "items": ["a", "b", "c"],
        "label_token_ids": LABELS,
        "apply_softmax": True,
    }
    scores = ok(post(gw, body))["scores"]
    assert scores == [pytest.approx(SOFTMAX, rel=1e-12)] * 3
    assert sum(scores[0]) == pytest.approx(1.0)
    two = ok(post(gw, {**body, "label_token_ids": [N, Y]}))["scores"][0]
    assert two == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)], rel=1e-12)


def test_item_first_puts_the_item_before_the_query(gw, backends):
    body = {"query": "?!", "items": ["first"], "label_token_ids": [Y], "item_first": True}
    assert ok(post(gw, body))["scores"] == [[pytest.approx(math.exp(-0.5), rel=1e-12)]]
    assert len(scheduled(backends, encode("first?!"))) == 1
    assert scheduled(backends, encode("?!first")) == []


def test_token_id_query_and_items(gw, backends):
    query, items = [7001, 7002], [[7003], [7004, 7005]]
    body = {"query": query, "items": items, "label_token_ids": [N, A]}
    answer = ok(post(gw, body))
    assert answer["scores"] == [pytest.approx([math.exp(-1.5), math.exp(-4.0)], rel=1e-12)] * 2
    assert answer["usage"]["prompt_tokens"] == 3 + 4
    assert len(scheduled(backends, [7001, 7002, 7003])) == 1
    assert len(scheduled(backends, [7001, 7002, 7004, 7005])) == 1
    ok(post(gw, {**body, "item_first": True}))
    assert len(scheduled(backends, [7004, 7005, 7001, 7002])) == 1


def test_a_single_text_item_is_one_item(gw):
    scores = ok(post(gw, {"query": "Q", "items": "x", "label_token_ids": [Y]}))["scores"]
    assert scores == [[pytest.approx(math.exp(-0.5), rel=1e-12)]]


def test_too_many_items_get_a_400(gw, monkeypatch):
    items = ["a"] * (scoring.MAX_SCORE_ITEMS + 1)
    error(post(gw, {"query": "Q", "items": items, "label_token_ids": [Y]}), "items")
    monkeypatch.setattr(scoring, "MAX_SCORE_ITEMS", 2)
    body = {"query": "Q", "label_token_ids": [Y]}
    assert len(ok(post(gw, {**body, "items": ["a", "b"]}))["scores"]) == 2
    err = error(post(gw, {**body, "items": ["a", "b", "c"]}), "items")
    assert "more than the 2" in err["message"]
    error(post(gw, {**body, "items": []}), "items")


@pytest.mark.parametrize(
    "labels",
    [[VOCAB_SIZE], [-1], [], [Y] * (MAX_TOKEN_IDS_LOGPROB + 1)],
    ids=["past the vocabulary", "negative", "none", "too many"],
)
def test_bad_label_token_ids_get_a_400(gw, labels):
    error(post(gw, {"query": "Q", "items": ["a"], "label_token_ids": labels}), "label_token_ids")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"query": "Q", "items": [[65]]}, "items"),  # text query, token-id items
        ({"query": [65], "items": ["a"]}, "items"),
        ({"query": [VOCAB_SIZE], "items": [[65]]}, "query"),
        ({"query": [65], "items": [[VOCAB_SIZE]]}, "items"),
    ],
)
def test_mixed_or_out_of_range_prompts_get_a_400(gw, body, param):
    error(post(gw, {**body, "label_token_ids": [Y]}), param)


def test_unknown_fields_and_missing_ones_get_a_400(gw):
    body = {"query": "Q", "items": ["a"], "label_token_ids": [Y]}
    error(post(gw, {**body, "top_k": 1}), "top_k")
    assert post(gw, {"query": "Q", "items": ["a"]}).status_code == 400


def test_an_unknown_model_is_a_404(gw):
    body = {"model": "no-such-model", "query": "Q", "items": ["a"], "label_token_ids": [Y]}
    err = error(post(gw, body), "model", status=404)
    assert err["code"] == "model_not_found"


class AbortAnsweringScheduler(fakes.FakeScheduler):
    """Answers an abort with the finish event the real scheduler sends (FINISH_REASON_ABORT)."""

    def Generate(self, request, context):
        yield from super().Generate(request, context)
        if not context.is_active():
            yield scheduler_pb2.SchedulerGenerateResponse(
                request_id=request.request_id, finish_reason=common_pb2.FINISH_REASON_ABORT
            )


def test_a_score_cut_off_by_the_deadline_or_an_abort_answers_an_error(monkeypatch):
    monkeypatch.setattr(fakes, "FakeScheduler", AbortAnsweringScheduler)
    slow = FakeBackends(step_delay=0.5)  # the one output position comes after 0.5 s
    timed, untimed = RunningGateway(slow, request_timeout=0.1), RunningGateway(slow)
    body = {"query": "Q", "items": ["a", "b"], "label_token_ids": [Y]}
    try:
        assert error(post(timed, body), None, status=504)["code"] == "request_timeout"
        answers = []
        scoring = threading.Thread(target=lambda: answers.append(post(untimed, body)))
        scoring.start()
        assert wait_until(lambda: len(slow.scheduler.active) == 2)
        aborted = httpx.post(untimed.base_url + "/abort_request", json={"abort_all": True})
        assert aborted.status_code == 200, aborted.text
        scoring.join(10)
        assert error(answers[0], None, status=499)["code"] == "cancelled"
    finally:
        timed.close()
        untimed.close()
        slow.stop()
