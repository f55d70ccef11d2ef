"""DBRX and Grok-1 through the executor's normal path (ModelRunner: safetensors, stacked experts).

DBRX is checked against transformers' DbrxForCausalLM; Grok-1 (remote code only) against
grok_reference_logits below, a plain-torch forward written from the HF port's published semantics
(modeling_grok1.py: four RMSNorms per layer, scores q.k * attn_output_multiplier soft-capped by
max_attn_value * tanh(. / max_attn_value), softmax top-2 of 8 experts without renormalization, exact-GELU
experts linear / linear_v / linear_1, embedding and output multipliers) over a random checkpoint saved
with the port's tensor names. Both are tiny fp32 models: last-position logits of batched prefill, decode
with prefix reuse and chunked prefill within atol 1e-4 (hf_parity's checks), 32 greedy tokens
identical; the triton attention backend (interpreted) on one case each; TP=2 on gloo equal to TP=1.
`pytest -m cuda` runs both on a GPU, where the MoE layers go through kernels/fused_moe.py.
"""

import json
import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import safetensors.torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from radixserve.executor.layers.moe import FusedMoE  # noqa: E402
from radixserve.executor.model_config import with_standard_keys  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402
from radixserve.kernels import fused_moe as fused_moe_module  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.hf_parity import (  # noqa: E402
    ATOL,
    VOCAB,
    build_hf_model,
    check_batched_prefill_decode_and_prefix_reuse,
    check_chunked_prefill,
    check_greedy_matches_hf_generate,
    prompts,
)
from tests.tp_ranks import ATOL as TP_ATOL  # noqa: E402
from tests.tp_ranks import GREEDY_TOKENS, run_group, scenario  # noqa: E402

CUDA = torch.cuda.is_available()


def dbrx_config() -> transformers.DbrxConfig:
    return transformers.DbrxConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=512,
        vocab_size=VOCAB,
        # clip_qkv 1.0 clips most of the wide random q/k/v; transformers 5.25 reads
        # attn_config.rope_theta (its rotation uses rope_parameters, 10000 by default)
        attn_config={"kv_n_heads": 2, "clip_qkv": 1.0, "rope_theta": 10000.0},
        ffn_config={
            "ffn_hidden_size": 48,
            "moe_num_experts": 4,
            "moe_top_k": 2,
            "moe_normalize_expert_weights": 1.0,
        },
    )


GROK_CONFIG = {
    "architectures": ["Grok1ModelForCausalLM"],
    "model_type": "grok-1",
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "attn_output_multiplier": 0.3,
    "max_attn_value": 2.0,  # small enough that the cap bends most scores of this tiny model
    "embedding_multiplier_scale": 4.0,
    "output_multiplier_scale": 0.5,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 512,
    "torch_dtype": "float32",  # no tie_word_embeddings: tied, the port's default
}


def grok_checkpoint(config: dict) -> dict[str, torch.Tensor]:
    """Random weights under the HF port's tensor names, wide like hf_parity's."""
    g = torch.Generator().manual_seed(0)
    h, inter, d = config["hidden_size"], config["intermediate_size"], 16
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]

    def normal(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def norm_scale():
        return torch.rand(h, generator=g) + 0.5

    w = {"model.embed_tokens.weight": normal(config["vocab_size"], h, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, rows in (("q", heads * d), ("k", kv * d), ("v", kv * d)):
            w[f"{p}attn.{name}_proj.weight"] = normal(rows, h)
        w[f"{p}attn.o_proj.weight"] = normal(h, heads * d)
        w[f"{p}moe_block.gate.weight"] = normal(config["num_experts"], h, std=0.5)
        for j in range(config["num_experts"]):
            w[f"{p}moe_block.experts.{j}.linear.weight"] = normal(inter, h)
            w[f"{p}moe_block.experts.{j}.linear_v.weight"] = normal(inter, h)
            w[f"{p}moe_block.experts.{j}.linear_1.weight"] = normal(h, inter)
        for norm in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
            w[f"{p}{norm}.scale"] = norm_scale()
    w["model.norm.scale"] = norm_scale()
    return w


def grok_reference_logits(w: dict, config: dict, ids: torch.Tensor, cap: bool = True):
    """Logits [L, vocab] of one sequence (no cache): the HF port's forward, in plain torch."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config["hidden_size"] // heads
    eps = config["rms_norm_eps"]
    cap_value = config["max_attn_value"]

    def rms(x, scale):
        return scale * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    length = ids.shape[0]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(length).float()[:, None] * inv_freq[None, :]
    cos, sin = (
        torch.cat([angles.cos()] * 2, -1)[:, None],
        torch.cat([angles.sin()] * 2, -1)[:, None],
    )

    def rotate(t):
        half = torch.cat((-t[..., d // 2 :], t[..., : d // 2]), -1)
        return t * cos + half * sin

    x = w["model.embed_tokens.weight"][ids] * config["embedding_multiplier_scale"]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[f"{p}pre_attn_norm.scale"])
        q = rotate((h @ w[f"{p}attn.q_proj.weight"].T).view(length, heads, d))
        k = rotate((h @ w[f"{p}attn.k_proj.weight"].T).view(length, kv, d))
        v = (h @ w[f"{p}attn.v_proj.weight"].T).view(length, kv, d)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * config["attn_output_multiplier"]
        if cap:
            scores = cap_value * torch.tanh(scores / cap_value)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        o = torch.einsum("hqk,khd->qhd", probs, v).reshape(length, heads * d)
        x = x + rms(o @ w[f"{p}attn.o_proj.weight"].T, w[f"{p}post_attn_norm.scale"])
        h = rms(x, w[f"{p}pre_moe_norm.scale"])
        route = torch.softmax(h @ w[f"{p}moe_block.gate.weight"].T, -1)
        top_w, top_i = torch.topk(route, config["num_experts_per_tok"], -1)
        moe = torch.zeros_like(h)
        for j in range(
            config["num_experts"]
        ):  # every expert on every token, weighted 0 unless chosen
            e = f"{p}moe_block.experts.{j}."
            act = F.gelu(h @ w[f"{e}linear.weight"].T) * (h @ w[f"{e}linear_v.weight"].T)
            moe += (top_w * (top_i == j)).sum(-1, keepdim=True) * (act @ w[f"{e}linear_1.weight"].T)
        x = x + rms(moe, w[f"{p}post_moe_norm.scale"])
    x = rms(x, w["model.norm.scale"])
    return (x @ w["model.embed_tokens.weight"].T) * config["output_multiplier_scale"]


class GrokReference:
    """grok_reference_logits behind the two calls hf_parity's checks make of an HF model."""

    def __init__(self, weights: dict, config: dict):
        self.weights, self.config = weights, config

    def __call__(self, ids: torch.Tensor):
        return SimpleNamespace(
            logits=grok_reference_logits(self.weights, self.config, ids[0])[None]
        )

    def generate(self, ids: torch.Tensor, max_new_tokens: int, **_greedy) -> torch.Tensor:
        seq = ids[0].tolist()
        for _ in range(max_new_tokens):
            seq.append(
                int(
                    grok_reference_logits(self.weights, self.config, torch.tensor(seq))[-1].argmax()
                )
            )
        return torch.tensor([seq])


def build_grok(folder) -> GrokReference:
    folder.mkdir(parents=True, exist_ok=True)
    weights = grok_checkpoint(GROK_CONFIG)
    (folder / "config.json").write_text(json.dumps(GROK_CONFIG))
    safetensors.torch.save_file(weights, str(folder / "model.safetensors"))
    return GrokReference(weights, GROK_CONFIG)


def build_dbrx(folder) -> torch.nn.Module:
    """hf_parity's random model, its attention projections (named norm_attn_norm.attn.*, so drawn
    like norm weights there, all positive) drawn again like other projections."""
    hf = build_hf_model(dbrx_config(), folder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in hf.transformer.blocks:
            for proj in (block.norm_attn_norm.attn.Wqkv, block.norm_attn_norm.attn.out_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * 0.1)
    hf.save_pretrained(folder)
    return hf


def build(name: str, folder):
    """(reference, folder) of a tiny saved model: transformers' DBRX, or Grok-1 and its reference."""
    if name == "dbrx":
        return build_dbrx(folder)
    return build_grok(folder)


def make_runner(folder, backend: str, device: str = "cpu", max_total_tokens: int = 1024):
    return ModelRunner(
        folder,
        runner_config(
            dtype="float32",
            device=device,
            max_total_tokens=max_total_tokens,
            attention_backend=backend,
        ),
    )


@pytest.fixture(scope="module", params=["dbrx", "grok"])
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return build(request.param, folder), make_runner(folder, "torch_native")


def test_batched_prefill_decode_and_prefix_reuse(models):
    check_batched_prefill_decode_and_prefix_reuse(models)


def test_chunked_prefill(models):
    check_chunked_prefill(models)


def test_greedy_matches_reference_generate(models):
    check_greedy_matches_hf_generate(models)


def test_every_layer_routes_through_fused_moe(models):
    _, runner = models
    layers = runner.model.model.layers
    assert all(isinstance(layer.mlp.experts, FusedMoE) for layer in layers)
    want = "gelu" if runner.config.architecture.startswith("Grok") else "silu"
    assert {layer.mlp.experts.activation for layer in layers} == {want}


def test_original_dbrx_config_keys_get_standard_names():
    """databricks' config.json names no num_key_value_heads / rope_parameters: they come from
    attn_config; keys the config spells the standard way win."""
    original = {
        "d_model": 6144,
        "n_heads": 48,
        "n_layers": 40,
        "max_seq_len": 32768,
        "attn_config": {"kv_n_heads": 8, "rope_theta": 500000, "clip_qkv": 8},
        "vocab_size": 100352,
    }
    hf = with_standard_keys(original)
    assert hf == original | {
        "hidden_size": 6144,
        "num_attention_heads": 48,
        "num_hidden_layers": 40,
        "max_position_embeddings": 32768,
        "num_key_value_heads": 8,
        "rope_theta": 500000,
    }
    assert with_standard_keys({"d_model": 1, "hidden_size": 2})["hidden_size"] == 2


def test_grok_soft_cap_matters():
    """The reference's cap changes the logits of the test model (so the parity above checks it)."""
    weights = grok_checkpoint(GROK_CONFIG)
    ids = torch.tensor(prompts(7, 12)[0])
    capped = grok_reference_logits(weights, GROK_CONFIG, ids)
    uncapped = grok_reference_logits(weights, GROK_CONFIG, ids, cap=False)
    assert (capped - uncapped).abs().max() > 100 * ATOL


def test_fused_moe_kernel_gelu_experts(activation="gelu"):
    """The Triton fused MoE (interpreted on the CPU) with Grok's GELU experts equals its torch
    reference (which differs from the SiLU one)."""
    g = torch.Generator().manual_seed(0)
    device = "cuda" if CUDA else "cpu"
    T, E, H, inter, k = 5, 4, 32, 16, 2
    x = torch.randn(T, H, generator=g).to(device)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) * H**-0.5).to(device)
    w2 = (torch.randn(E, H, inter, generator=g) * inter**-0.5).to(device)
    weights, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), -1), k, dim=-1)
    weights, ids = weights.to(device), ids.to(device)
    got = fused_moe_module.fused_moe(x, w13, w2, weights, ids, activation=activation)
    ref = fused_moe_module.fused_moe_ref(x, w13, w2, weights, ids, activation=activation)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    silu = fused_moe_module.fused_moe_ref(x, w13, w2, weights, ids)
    assert (ref - silu).abs().max() > 1e-3


def test_triton_attention_backend(models):
    """The triton attention backend (interpreted on the CPU; Grok's scores soft-capped in its
    kernels): chunked prefill."""
    ref, runner = models
    check_chunked_prefill((ref, make_runner(runner.config.path, "triton", max_total_tokens=128)))


def test_dbrx_fused_checkpoint_tensors_are_split_per_expert(models):
    hf, runner = models
    if runner.config.architecture != "DbrxForCausalLM":
        pytest.skip("DBRX only")
    mlp = hf.transformer.blocks[1].ffn.experts.mlp
    experts = runner.model.model.layers[1].mlp.experts
    inter = mlp.w1.shape[0] // experts.num_experts
    e = 3
    w13, w2 = experts.w13_weight[e], experts.w2_weight[e]
    torch.testing.assert_close(
        w13[:inter], mlp.w1.data[e * inter : (e + 1) * inter], rtol=0, atol=0
    )
    torch.testing.assert_close(
        w13[inter:], mlp.v1.data[e * inter : (e + 1) * inter], rtol=0, atol=0
    )
    torch.testing.assert_close(w2, mlp.w2.data[e * inter : (e + 1) * inter].T, rtol=0, atol=0)


def test_two_shards_match_one(models, tmp_path):
    """TP=2 on gloo equal to TP=1 (DBRX: each shard holds half of every expert; Grok, at --ep-size 2:
    half of the experts, whole)."""
    _, runner = models
    ep, experts = (1, 4) if runner.config.architecture == "DbrxForCausalLM" else (2, 8)
    runner.reset()
    expected = scenario(runner)
    got = run_group(runner.config.path, tmp_path / "tp2.pt", ep=ep)
    assert got["moe_local_experts"] == [experts // ep]
    for part in ("prefill", "decode", "chunked"):
        torch.testing.assert_close(got[part], expected[part], atol=TP_ATOL, rtol=TP_ATOL, msg=part)
    assert len(got["greedy"]) == GREEDY_TOKENS and got["greedy"] == expected["greedy"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dbrx", "grok"])
def test_cuda_fused_moe_kernel_matches_reference(name, tmp_path, monkeypatch):
    """On a GPU: the MoE layers run kernels/fused_moe.py, attention the triton backend; fp32
    logits and greedy tokens as on the CPU."""
    calls = []
    kernel = fused_moe_module.fused_moe

    def counted(*args, **kwargs):
        calls.append(kwargs.get("activation"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fused_moe_module, "fused_moe", counted)
    ref = build(name, tmp_path)
    models = (ref, make_runner(tmp_path, "triton", device="cuda"))
    check_batched_prefill_decode_and_prefix_reuse(models)
    check_chunked_prefill(models)
    check_greedy_matches_hf_generate(models)
    assert calls and set(calls) == {"silu" if name == "dbrx" else "gelu"}
