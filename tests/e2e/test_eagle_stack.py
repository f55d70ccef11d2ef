"""EAGLE and STANDALONE speculative decoding through the whole stack (`radixserve serve
--speculative-algorithm EAGLE --speculative-draft-model-path HEAD` on the tiny random Llama, with a tiny
random EAGLE head saved in the published layout; `--speculative-algorithm STANDALONE` with the target's
own folder as the draft model, dummy weights like the target's): the executor loads the draft and
proposes drafts, the scheduler verifies them; greedy outputs and logprobs equal plain decoding's (a
request with min_new_tokens = max_new_tokens decodes without speculation, so it is the reference),
concurrent sampled requests all finish, the counters reach /get_server_info, and the scheduler's idle
leak check finds nothing."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import save_file

from tests.e2e.speculation import (
    check_concurrent_requests_finish,
    check_greedy_equals_plain_decoding,
    spec_counters,
    speculative_stack,
    stack_log,
)
from tests.tiny_stack import tiny_model


def save_head(folder, target_config: dict) -> None:
    """A random 1-layer EAGLE head (fc with bias; layer 0 without input_layernorm) for the target."""
    hidden, inter = target_config["hidden_size"], target_config["intermediate_size"]
    heads, kv_heads = target_config["num_attention_heads"], target_config["num_key_value_heads"]
    head_dim = hidden // heads
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    tensors = {
        "fc.weight": rand(hidden, 2 * hidden),
        "fc.bias": rand(hidden),
        "layers.0.self_attn.q_proj.weight": rand(heads * head_dim, hidden),
        "layers.0.self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
        "layers.0.self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
        "layers.0.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "layers.0.mlp.gate_proj.weight": rand(inter, hidden),
        "layers.0.mlp.up_proj.weight": rand(inter, hidden),
        "layers.0.mlp.down_proj.weight": rand(hidden, inter),
        "layers.0.post_attention_layernorm.weight": torch.ones(hidden),
    }
    folder.mkdir(parents=True, exist_ok=True)
    config = {**target_config, "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.fixture(scope="module", params=["EAGLE", "STANDALONE"])
def stack(tmp_path_factory, request):
    algorithm = request.param
    folder = tmp_path_factory.mktemp(algorithm.lower())
    target = json.loads((tiny_model(folder / "model") / "config.json").read_text())
    if algorithm == "EAGLE":
        save_head(folder / "head", target)
    draft = folder / ("head" if algorithm == "EAGLE" else "model")  # STANDALONE: the target
    flags = ("--speculative-algorithm", algorithm, "--speculative-draft-model-path", str(draft))
    with speculative_stack(folder, *flags, "--speculative-num-steps", "3") as s:
        s.algorithm = algorithm
        yield s


def test_greedy_with_eagle_equals_plain_decoding(stack):
    before = spec_counters(stack)
    check_greedy_equals_plain_decoding(stack)
    after = spec_counters(stack)
    if stack.algorithm == "STANDALONE":  # the target's own weights: every draft right
        # N tokens: the prefill's first, then 39 by 10 verify steps of 4 (the last one 3).
        assert after["spec_verify_steps"] - before["spec_verify_steps"] == 10
        assert after["spec_accepted_tokens"] - before["spec_accepted_tokens"] == 9 * 3 + 2


def test_concurrent_requests_finish_and_no_leak_when_idle(stack):
    check_concurrent_requests_finish(stack, requests=10, threads=5, max_new_tokens=20)
    config = httpx.get(stack.base_url + "/get_server_info", timeout=60).json()["scheduler"][
        "config"
    ]
    assert config["speculative_algorithm"] == stack.algorithm
    assert config["speculative_num_draft_tokens"] == 4
    log = stack_log(stack)
    draft = "head" if stack.algorithm == "EAGLE" else "model"
    assert f"{stack.algorithm} draft {draft} from" in log
    assert "leak" not in log, log[-2000:]
