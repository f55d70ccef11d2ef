"""DeepSeek V2 (with and without q_lora_rank) and V3 against transformers, on tiny random fp32 models
saved as HF folders and loaded through ModelRunner (the compressed MLA cache, grouped MoE routing).

The parity checks are hf_parity's: batched prefill + decode + prefix reuse and chunked prefill
(last-position logits within atol 1e-4 of HF's forward) and 32 greedy tokens identical to HF's
generate, with attention on torch_native (the triton backend, under the interpreter, runs once in
test_triton_backend_matches_torch). Also: absorbed decode equals the naive (expanded) decode, the KV
pool's bytes per token are MLA's, and V3's MTP layer tensors load into a module the forward skips.
"""

import shutil

import pytest
import safetensors.torch
import torch
import transformers

from tests.executor.hf_parity import (  # sets TRITON_INTERPRET=1 without CUDA, before triton loads
    VOCAB,
    SlotPool,
    build_hf_model,
    check_batched_prefill_decode_and_prefix_reuse,
    check_chunked_prefill,
    check_greedy_matches_hf_generate,
    prompts,
)

from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.kv_cache import kv_bytes_per_token
from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from tests.tp_ranks import ATOL, GREEDY_TOKENS, build_runner, on_cpu, run_group, scenario

CUDA = torch.cuda.is_available()
BACKEND = "triton" if CUDA else "torch_native"
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

CONFIGS = {
    # V2-Lite's shape: q_proj directly, greedy softmax routing, YaRN with mscale.
    "v2_lite": lambda: transformers.DeepseekV2Config(
        **COMMON, q_lora_rank=None, n_routed_experts=8, topk_method="greedy", rope_parameters=YARN
    ),
    # V2's: q_lora_rank, group-limited greedy routing, routed_scaling_factor.
    "v2_qlora": lambda: transformers.DeepseekV2Config(
        **COMMON,
        q_lora_rank=24,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        routed_scaling_factor=2.0,
    ),
    # V3's: noaux_tc sigmoid routing with a correction bias, norm_topk_prob, interleaved YaRN rope.
    "v3": lambda: transformers.DeepseekV3Config(
        **COMMON,
        q_lora_rank=24,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8),  # an attention factor != 1
    ),
}


def _build(name: str, folder) -> torch.nn.Module:
    hf = build_hf_model(CONFIGS[name](), folder)
    biases = [
        m.e_score_correction_bias for m in hf.modules() if hasattr(m, "e_score_correction_bias")
    ]
    if biases:
        with torch.no_grad():  # a bias that changes the routing (HF leaves it zero)
            for bias in biases:
                bias.uniform_(-0.3, 0.3)
        hf.save_pretrained(folder)
    return hf


def _runner(folder, **fields) -> ModelRunner:
    fields.setdefault("attention_backend", BACKEND)
    fields.setdefault("max_total_tokens", 1024)
    return ModelRunner(
        folder, runner_config(dtype="float32", device="cuda" if CUDA else "cpu", **fields)
    )


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = _build(request.param, folder)
    return hf, _runner(folder)


def test_batched_prefill_decode_and_prefix_reuse(models):
    check_batched_prefill_decode_and_prefix_reuse(models)


def test_chunked_prefill(models):
    check_chunked_prefill(models)


def test_greedy_matches_hf_generate(models):
    check_greedy_matches_hf_generate(models)


def test_kv_pool_holds_the_compressed_latent(models):
    hf, runner = models
    cfg = hf.config
    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert runner.kv_pool.k[0].shape == (runner.kv_slots, 1, row)
    assert runner.kv_pool.v[0].numel() == 0
    assert runner.kv_bytes_per_token == cfg.num_hidden_layers * row * 4
    mha = kv_bytes_per_token(
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
        torch.float32,
        cfg.v_head_dim,
    )
    assert runner.kv_bytes_per_token * 3 < mha


def _decode_logits(runner: ModelRunner) -> torch.Tensor:
    """Logits of a batched decode step (sequences of different lengths) after their prefill."""
    runner.reset()
    pool = SlotPool(runner.kv_slots, seed=5)
    ps = prompts(7, 11, 4, 17)
    runner.step(
        StepInput(
            1, new_requests=[NewRequest(str(i), p, pool.take(len(p))) for i, p in enumerate(ps)]
        )
    )
    out = runner.step(
        StepInput(
            2, continuing_requests=[ContinuingRequest(str(i), pool.take(1)) for i in range(3)]
        )
    )
    return out.logits.cpu()


def test_absorbed_decode_equals_naive(models):
    _, runner = models
    attns = [layer.self_attn.attn for layer in runner.model.model.layers]
    absorbed = _decode_logits(runner)
    try:
        for attn in attns:
            attn.absorb = False
        naive = _decode_logits(runner)
    finally:
        for attn in attns:
            attn.absorb = True
    torch.testing.assert_close(absorbed, naive, atol=1e-4, rtol=0)


@pytest.mark.parametrize("models", ["v3"], indirect=True)
def test_mtp_layer_tensors_are_kept(models, tmp_path):
    """V3's checkpoint layer num_hidden_layers (the MTP layer) loads into model.mtp_layers."""
    hf, base = models
    assert len(base.model.model.mtp_layers) == 0  # HF's checkpoint has none: dropped after loading
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base.config.path / name, tmp_path / name)
    n = hf.config.num_hidden_layers
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    mtp = {  # the last layer's tensors (as saved: one tensor per expert) under the MTP index
        name.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): t
        for name, t in saved.items()
        if name.startswith(f"model.layers.{n - 1}.")
    }
    hidden = hf.config.hidden_size
    mtp.update(
        {
            f"model.layers.{n}.embed_tokens.weight": torch.randn(VOCAB, hidden),
            f"model.layers.{n}.enorm.weight": torch.rand(hidden),
            f"model.layers.{n}.hnorm.weight": torch.rand(hidden),
            f"model.layers.{n}.eh_proj.weight": torch.randn(hidden, 2 * hidden),
            f"model.layers.{n}.shared_head.norm.weight": torch.rand(hidden),
            f"model.layers.{n}.shared_head.head.weight": torch.randn(VOCAB, hidden),
        }
    )
    safetensors.torch.save_file(mtp, tmp_path / "mtp.safetensors")
    runner = _runner(tmp_path, max_total_tokens=64)
    (layer,) = runner.model.model.mtp_layers
    assert torch.equal(layer.eh_proj.weight.cpu(), mtp[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(
        layer.self_attn.kv_b_proj.weight.cpu(), mtp[f"model.layers.{n}.self_attn.kv_b_proj.weight"]
    )
    assert len(runner.model.model.layers) == n
    (p,) = prompts(9, 6)
    out = runner.step(StepInput(1, new_requests=[NewRequest("m", p, list(range(1, 7)))]))
    torch.testing.assert_close(
        out.logits[0].cpu(), hf(torch.tensor([p])).logits[0, -1].detach(), atol=1e-4, rtol=0
    )


@pytest.mark.skipif(CUDA, reason="on CUDA every test above runs the triton backend")
@pytest.mark.parametrize("models", ["v3"], indirect=True)
def test_triton_backend_matches_hf(models, monkeypatch):
    """The triton attention backend (kernels/mla_decode.py for decode), under the interpreter."""
    import radixserve.kernels.mla_decode as kernel

    calls = []
    kernel_fn = kernel.mla_decode
    monkeypatch.setattr(kernel, "mla_decode", lambda *a, **k: calls.append(1) or kernel_fn(*a, **k))
    hf, runner = models
    triton_runner = _runner(runner.config.path, attention_backend="triton", max_total_tokens=256)
    check_batched_prefill_decode_and_prefix_reuse((hf, triton_runner))
    # per layer, in the step with a generated token; a one-token prompt runs as an extend (as its
    # prefill would: batch_builder.py), so its step does not call the decode kernel
    assert len(calls) == hf.config.num_hidden_layers, len(calls)


@pytest.mark.parametrize("models", ["v3"], indirect=True)
def test_two_shards_match_one(models, tmp_path):
    """TP=2 on the CPU (gloo): heads split over the shards, the latent and its cache replicated, the
    experts split by intermediate size; the logits and greedy tokens of TP=1."""
    _, runner = models
    expected = on_cpu(scenario(build_runner(str(runner.config.path))))
    got = run_group(runner.config.path, tmp_path / "tp2.pt")
    for part in ("prefill", "decode", "chunked"):
        torch.testing.assert_close(got[part], expected[part], atol=ATOL, rtol=ATOL, msg=part)
    assert len(got["greedy"]) == GREEDY_TOKENS and got["greedy"] == expected["greedy"]
    assert got["kv_slots"] == 1025  # max_total_tokens + the padding slot, on every shard


@pytest.mark.parametrize(
    "extra",
    [
        {"mscale": 1.0, "mscale_all_dim": 0.8},
        {"mscale": None, "mscale_all_dim": None, "truncate": False},
        {"attention_factor": 1.3},
    ],
)
def test_yarn_tables_match_transformers(extra):
    """layers/rotary.py's YaRN: inv_freq and the attention factor (mscale / mscale_all_dim) as
    transformers computes them, folded into the cos/sin tables."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from radixserve.executor.layers.rotary import RotaryEmbedding, rope_settings

    config = CONFIGS["v2_lite"]()
    config.rope_parameters = {k: v for k, v in dict(YARN, **extra).items() if v is not None}
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    theta, scaling = rope_settings(config.to_dict())
    rotary = RotaryEmbedding(config.qk_rope_head_dim, 100, theta, scaling, torch.float32)
    freqs = torch.arange(100).float()[:, None] * inv_freq[None, :]
    half = config.qk_rope_head_dim // 2
    assert factor != 1.0
    torch.testing.assert_close(rotary.cos_table[:, :half], freqs.cos() * factor)
    torch.testing.assert_close(rotary.sin_table[:, half:], freqs.sin() * factor)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy", "noaux_tc"])
def test_routing_matches_transformers_routers(method):
    """select_experts_grouped against HF's V2 (softmax) and V3 (sigmoid, correction bias) routers,
    with more experts per token than groups kept, so that the group limit changes the choice."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from radixserve.executor.layers.moe import select_experts_grouped

    shape = dict(
        hidden_size=32,
        num_experts_per_tok=4,
        n_routed_experts=16,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.0,
    )
    torch.manual_seed(0)
    if method == "noaux_tc":
        hf = DeepseekV3TopkRouter(transformers.DeepseekV3Config(**shape, norm_topk_prob=True))
        hf.e_score_correction_bias.uniform_(-0.2, 0.2)
    else:
        hf = DeepseekV2TopkRouter(transformers.DeepseekV2Config(**shape, topk_method=method))
    with torch.no_grad():
        hf.weight.normal_()
        x = torch.randn(64, 32)
        logits, hf_weights, hf_ids = hf(x)
    weights, ids = select_experts_grouped(
        logits,
        4,
        method,
        4,
        2,
        "sigmoid" if method == "noaux_tc" else "softmax",
        getattr(hf, "e_score_correction_bias", None),
        renormalize=method == "noaux_tc",
        scaling_factor=2.0,
    )
    order, hf_order = ids.argsort(dim=-1), hf_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order))
    if method != "greedy":  # the group limit made a difference somewhere
        greedy = select_experts_grouped(logits, 4, "greedy")[1].sort(dim=-1).values
        assert not torch.equal(greedy, ids.sort(dim=-1).values)


@pytest.mark.parametrize("models", ["v2_lite"], indirect=True)
def test_fp8_latent_cache(models):
    """--kv-cache-dtype fp8_e4m3: the latent rows stored in fp8 (a quarter of fp32's bytes), decode
    logits near the fp32 cache's (fp8's rounding of the latents: within 0.05 here)."""
    _, runner = models
    fp8 = _runner(runner.config.path, kv_cache_dtype="fp8_e4m3", max_total_tokens=256)
    assert fp8.kv_pool.k[0].dtype == torch.float8_e4m3fn
    assert fp8.kv_bytes_per_token * 4 == runner.kv_bytes_per_token
    torch.testing.assert_close(_decode_logits(fp8), _decode_logits(runner), atol=0.05, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_with_padded_batch(tmp_path):
    """Decode replayed from CUDA graphs: a batch of 3 runs in the graph of 4, whose padding token
    carries KV slot -1 (the MLA store sends it to the sink slot instead of indexing out of bounds)."""
    hf = _build("v3", tmp_path)
    runner = _runner(tmp_path, attention_backend="triton", cuda_graph_max_bs=4)
    check_batched_prefill_decode_and_prefix_reuse((hf, runner))
    check_greedy_matches_hf_generate((hf, runner))
