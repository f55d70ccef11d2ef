"""LoRA adapters through the whole stack (`radixserve serve` on the tiny random Llama with two dummy
adapters from --lora-paths): the adapters are models (/v1/models, parent = the base model), chosen by
`model` ("BASE:NAME" or "NAME"), /generate's lora_path and the gRPC API's lora_name; their greedy output
differs from the base model's and from each other's; the same prompt under two adapters shares no cached
KV (usage.prompt_tokens_details.cached_tokens); an adapter loaded at run time serves, and once unloaded
is a 404 (OpenAI error body, model_not_found) like any unknown name; nothing leaks."""

from __future__ import annotations

import json

import httpx
import pytest

from radixserve.executor.lora.dummy import make_dummy_adapter
from tests.stack import scheduler_info, stop_stack, wait_idle_and_check_no_leak
from tests.tiny_stack import MODEL, start_tiny_stack

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 1234, 88, 99, 2000, 3000, 4000]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_stack")
    # the torch backend: the same on any CPU test run (the triton kernels would run in the Triton
    # interpreter when an earlier test module set TRITON_INTERPRET; tests/executor covers them)
    running = start_tiny_stack(
        root, "--enable-lora", "--max-loras-per-batch", "2", "--lora-backend", "torch"
    )
    config = json.loads((root / "model" / "config.json").read_text())
    running.adapters = {
        name: make_dummy_adapter(
            config, root / name, rank, seed=i, scale=4.0, dtype=__import__("torch").float32
        )
        for i, (name, rank) in enumerate([("alpha", 8), ("beta", 4), ("gamma", 16)])
    }
    for name in ("alpha", "beta"):
        r = httpx.post(
            running.base_url + "/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(running.adapters[name])},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    yield running
    stop_stack(running)


def complete(stack, model: str, prompt=PROMPT, n_tokens=8) -> dict:
    r = httpx.post(
        stack.base_url + "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def tokens(resp: dict) -> str:
    return resp["choices"][0]["text"]


def cached(resp: dict) -> int:
    details = resp["usage"].get("prompt_tokens_details") or {}
    return details.get("cached_tokens") or 0


def test_models_lists_adapters_with_their_parent(stack):
    data = httpx.get(stack.base_url + "/v1/models", timeout=10).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id[MODEL]["parent"] is None
    for name in ("alpha", "beta"):
        assert by_id[name]["parent"] == MODEL and by_id[name]["root"] == str(stack.adapters[name])
    card = httpx.get(stack.base_url + f"/v1/models/{MODEL}:alpha", timeout=10).json()
    assert card["id"] == "alpha"


def test_adapters_change_the_output_and_never_share_cached_kv(stack):
    prompt = PROMPT + [7, 8, 9]
    base = complete(stack, MODEL, prompt)
    again = complete(stack, MODEL, prompt)
    assert cached(again) > 0 and tokens(again) == tokens(base)
    alpha = complete(stack, f"{MODEL}:alpha", prompt)
    assert cached(alpha) == 0  # the base model's KV of this prompt is not alpha's
    beta = complete(stack, "beta", prompt)
    assert cached(beta) == 0
    assert len({tokens(base), tokens(alpha), tokens(beta)}) == 3
    alpha2 = complete(stack, "alpha", prompt)
    assert cached(alpha2) > 0 and tokens(alpha2) == tokens(alpha)
    # SGLang's /generate picks it by lora_path
    r = httpx.post(
        stack.base_url + "/generate",
        json={
            "input_ids": prompt,
            "lora_path": "alpha",
            "sampling_params": {"max_new_tokens": 8, "temperature": 0},
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["text"] == tokens(alpha)
    wait_idle_and_check_no_leak(stack)


def test_load_use_unload_then_404(stack):
    url = stack.base_url
    gamma = str(stack.adapters["gamma"])
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": gamma})
    assert r.status_code == 200, r.text
    out = complete(stack, "gamma")
    assert tokens(out) != tokens(complete(stack, MODEL))
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=60)
    assert r.status_code == 200, r.text
    for body in (
        {"model": "gamma", "prompt": PROMPT, "max_tokens": 4},
        {"model": f"{MODEL}:gamma", "prompt": PROMPT, "max_tokens": 4},
        {"model": "never-loaded", "prompt": PROMPT, "max_tokens": 4},
    ):
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(
        url + "/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"}
    )
    assert r.status_code == 400, r.text
    # loaded again under the same name: served again
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "gamma", "lora_path": gamma})
    assert r.status_code == 200, r.text
    assert tokens(complete(stack, "gamma")) == tokens(out)
    assert "gamma" in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
    wait_idle_and_check_no_leak(stack)


def test_unload_waits_for_running_requests(stack):
    import threading
    import time

    url = stack.base_url
    results = {}

    def long_request():
        results["long"] = httpx.post(
            url + "/v1/completions",
            json={
                "model": "beta",
                "prompt": PROMPT,
                "max_tokens": 1000,
                "temperature": 0,
                "ignore_eos": True,
            },
            timeout=300,
        )

    def unload():
        results["unload"] = httpx.post(
            url + "/unload_lora_adapter", json={"lora_name": "beta"}, timeout=300
        )

    running = threading.Thread(target=long_request)
    running.start()
    deadline = time.time() + 30
    while scheduler_info(stack).running_requests == 0 and time.time() < deadline:
        time.sleep(0.05)
    unloading = threading.Thread(target=unload)
    unloading.start()

    def listed() -> set[str]:
        return {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}

    deadline = time.time() + 30  # the unload has arrived once beta is no longer listed
    while "beta" in listed() and time.time() < deadline:
        time.sleep(0.05)
    # while beta's request runs, the unload waits, and new requests naming beta get 404 at once
    assert running.is_alive() and unloading.is_alive()
    r = httpx.post(
        url + "/v1/completions", json={"model": "beta", "prompt": PROMPT, "max_tokens": 2}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "beta" not in listed()
    unloading.join(300)
    assert results["unload"].status_code == 200, results["unload"].text
    assert scheduler_info(stack).running_requests == 0  # it returned once beta's request ended
    running.join(300)
    assert results["long"].status_code == 200
    assert results["long"].json()["usage"]["completion_tokens"] == 1000
    wait_idle_and_check_no_leak(stack)


def test_grpc_api_lora_name(stack):
    import grpc

    from radixserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    def generate(**fields) -> list[int]:
        with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.GatewayGenerateRequest(
                input_ids=common_pb2.TokenIds(ids=PROMPT),
                sampling=common_pb2.SamplingParams(temperature=0),
                stopping=common_pb2.StoppingCriteria(max_new_tokens=6),
                **fields,
            )
            return [t for m in stub.Generate(request, timeout=60) for t in m.token_ids]

    by_name = generate(lora_name="alpha")
    assert by_name == generate(model="alpha") == generate(model=f"{MODEL}:alpha")
    assert by_name != generate()
    with pytest.raises(grpc.RpcError) as err:
        generate(lora_name="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_adapters_loaded_at_run_time_survive_an_executor_restart(stack):
    """The supervisor restarts a killed executor, which loads only --lora-paths: the scheduler loads the
    adapters it had loaded at run time again before steps resume. (Last: it restarts the executor.)"""
    import os
    import signal
    import time

    from tests.tiny_stack import service_pids

    url = stack.base_url
    delta = str(stack.adapters["alpha"])
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "delta", "lora_path": delta})
    assert r.status_code == 200, r.text
    before = tokens(complete(stack, "delta"))
    executor = service_pids(stack.proc.pid)["executor"]
    os.kill(executor, signal.SIGKILL)
    deadline = time.time() + 120
    while (
        time.time() < deadline
    ):  # /health generates: it fails over the dead executor, then recovers
        health = httpx.get(url + "/health", timeout=30)
        if health.status_code == 200 and service_pids(stack.proc.pid).get("executor") != executor:
            break
        time.sleep(0.5)
    assert health.status_code == 200, stack.log_tail()
    assert tokens(complete(stack, "delta")) == before
    assert "loaded again on the restarted executor" in stack.log_tail(400)
    wait_idle_and_check_no_leak(stack)
