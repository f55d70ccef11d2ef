"""Issue 18 item 5: /v1/completions defaults to 16 tokens; server-side sampling defaults (the model's
generation_config.json, --preferred-sampling-params, --override-generation-config) fill what a request
leaves out, and the info routes show them."""

from __future__ import annotations

import httpx
import pytest

from radixserve.v1 import tokenizer_pb2
from radixserve.common.sampling import SamplingDefaults, SamplingError
from radixserve.gateway.pipeline.sampling import build_sampling, server_defaults
from tests.gateway.fakes import CONTEXT_LENGTH, MESSAGES, MODEL, FakeBackends, RunningGateway


def scheduled(backends: FakeBackends, response: httpx.Response):
    """The request the fake scheduler received for a (non-streamed, n=1) response."""
    assert response.status_code == 200, response.text
    return backends.scheduler.requests[response.json()["id"]]


@pytest.fixture(scope="module")
def plain(backends):
    running = RunningGateway(backends)
    yield running
    running.close()


@pytest.fixture(scope="module")
def configured():
    """A gateway whose model brings generation-config defaults, with both flags on top."""
    fakes = FakeBackends()
    fakes.tokenizer.generation_defaults = tokenizer_pb2.TokenizerGenerationDefaults(
        temperature=0.9, top_k=40, repetition_penalty=1.1
    )
    running = RunningGateway(
        fakes,
        preferred_sampling_params='{"temperature": 0.3, "max_new_tokens": 7}',
        override_generation_config='{"top_p": 0.5}',
    )
    yield running, fakes
    running.close()
    fakes.stop()


def test_completions_without_max_tokens_stop_after_16_tokens(plain, backends):
    r = httpx.post(plain.base_url + "/v1/completions", json={"model": MODEL, "prompt": "Once"})
    body = r.json()
    assert (
        body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"
    )
    assert scheduled(backends, r).stopping.max_new_tokens == 16


def test_chat_without_max_tokens_still_runs_to_the_end_of_the_context(plain, backends):
    r = httpx.post(plain.base_url + "/v1/chat/completions", json={"messages": MESSAGES})
    request = scheduled(backends, r)
    assert request.stopping.max_new_tokens == CONTEXT_LENGTH - len(request.input_ids)
    assert request.sampling.temperature == pytest.approx(1.0)  # the API's own default


def test_without_server_defaults_the_info_routes_show_none(plain):
    assert httpx.get(plain.base_url + "/get_model_info").json()["preferred_sampling_params"] is None
    assert httpx.get(plain.base_url + "/get_server_info").json()["sampling_defaults"] == {}


def test_server_defaults_fill_what_a_chat_leaves_out(configured):
    gw, fakes = configured
    r = httpx.post(gw.base_url + "/v1/chat/completions", json={"messages": MESSAGES})
    request = scheduled(fakes, r)
    sampling = request.sampling
    # preferred (0.3) over the model's 0.9; the model's top_k and repetition penalty; the override's top_p
    assert sampling.temperature == pytest.approx(0.3) and sampling.top_k == 40
    assert sampling.repetition_penalty == pytest.approx(1.1) and sampling.top_p == pytest.approx(
        0.5
    )
    assert request.stopping.max_new_tokens == 7 and r.json()["usage"]["completion_tokens"] == 7


def test_a_request_value_wins_over_every_server_default(configured):
    gw, fakes = configured
    r = httpx.post(
        gw.base_url + "/v1/chat/completions",
        json={"messages": MESSAGES, "temperature": 0, "top_p": 1, "top_k": -1, "max_tokens": 3},
    )
    sampling = scheduled(fakes, r).sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0, 1, 0)
    assert r.json()["usage"]["completion_tokens"] == 3


def test_server_max_new_tokens_is_also_the_completions_and_generate_default(configured):
    gw, fakes = configured
    r = httpx.post(gw.base_url + "/v1/completions", json={"prompt": "Once"})
    assert scheduled(fakes, r).stopping.max_new_tokens == 7
    r = httpx.post(gw.base_url + "/generate", json={"text": "Once"})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 7
    request = fakes.scheduler.requests[r.json()["meta_info"]["id"]]
    assert request.sampling.temperature == pytest.approx(0.3) and request.sampling.top_k == 40


def test_server_defaults_also_fill_responses_and_messages(configured):
    gw, fakes = configured
    r = httpx.post(gw.base_url + "/v1/responses", json={"model": MODEL, "input": "Once"})
    assert r.status_code == 200, r.text
    request = fakes.scheduler.requests[r.json()["id"]]
    assert request.sampling.temperature == pytest.approx(0.3) and request.sampling.top_k == 40
    assert request.stopping.max_new_tokens == 7
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(gw.base_url + "/v1/messages", json=body)
    assert r.status_code == 200, r.text
    request = fakes.scheduler.requests[r.json()["id"]]
    assert request.sampling.temperature == pytest.approx(0.3) and request.sampling.top_p == (
        pytest.approx(0.5)
    )
    assert request.stopping.max_new_tokens == 5  # Anthropic's max_tokens is required


def test_info_routes_show_the_effective_defaults(configured):
    gw, _ = configured
    want = {
        "temperature": 0.3,
        "top_p": 0.5,
        "top_k": 40,
        "repetition_penalty": pytest.approx(1.1),
        "max_new_tokens": 7,
    }
    assert httpx.get(gw.base_url + "/get_model_info").json()["preferred_sampling_params"] == want
    assert httpx.get(gw.base_url + "/get_server_info").json()["sampling_defaults"] == want


# ---- the pure pieces ----


def test_generation_config_keys_are_read_and_the_rest_ignored():
    defaults = SamplingDefaults.from_generation_config(
        {
            "eos_token_id": 2,
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.95,
            "max_new_tokens": 9,
        },
        "generation_config.json",
    )
    assert defaults.as_dict() == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 9}
    assert SamplingDefaults.from_proto(defaults.to_proto()) == defaults


@pytest.mark.parametrize(
    "text,param",
    [
        ('{"temperature": 3}', "temperature"),
        ('{"top_k": 1.5}', "top_k"),
        ('{"max_new_tokens": 0}', "max_new_tokens"),
        ('{"max_tokens": 5}', "max_tokens"),
        ('{"temperature": true}', "temperature"),
        ("[1]", "--flag"),
        ("{", "--flag"),
    ],
)
def test_bad_flag_values_are_refused_naming_the_key(text, param):
    with pytest.raises(SamplingError) as e:
        SamplingDefaults.from_json(text, "--flag")
    assert e.value.param == param and "--flag" in str(e.value)


def test_layers_apply_in_order_and_build_sampling_uses_them():
    class Flags:
        preferred_sampling_params = '{"temperature": 0.2, "min_p": 0.1}'
        override_generation_config = '{"temperature": 0.4}'

    defaults = server_defaults(SamplingDefaults(temperature=0.9, top_p=0.8), Flags())
    assert defaults.as_dict() == {"temperature": 0.4, "top_p": 0.8, "min_p": 0.1}
    common = dict(seed=None, max_tokens=None, stop_token_ids=None, ignore_eos=False, top_k=None)
    sampling, _ = build_sampling(
        temperature=None, top_p=None, min_p=None, defaults=defaults, **common
    )
    assert (sampling.temperature, sampling.top_p, sampling.min_p) == (0.4, 0.8, 0.1)
    sampling, _ = build_sampling(
        temperature=1.5, top_p=None, min_p=0.0, defaults=defaults, **common
    )
    assert (sampling.temperature, sampling.min_p) == (1.5, 0.0)
