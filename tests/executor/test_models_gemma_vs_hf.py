"""Sliding-window attention and the Gemma family against transformers, on tiny random fp32 models:
Mistral with a window (8) shorter than the prompts, Gemma (GeGLU, (1 + w) norms, scaled embeddings,
head_dim != hidden / heads), Gemma 2 (pre/post norms, query_pre_attn_scalar, soft-capped scores and
logits, a window on alternating layers) and Gemma 3 (q/k norms, local/global layers with their own
rotary bases). Every prompt of the checks (batched prefill with prefix reuse, chunked prefill, 32
greedy tokens) outgrows the window. torch_native for every model, triton (TRITON_INTERPRET=1 without
CUDA) for one Gemma 2 case; two CPU shards (gloo) against one for a Gemma 3 with Gemma 2's caps.

Tolerance: logits agree to atol 1e-4 (hf_parity.ATOL; fp32, the differences come from op order).
"""

import os

import pytest
import torch
import torch.nn.functional as F
import transformers

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.common.args import ServerArgs  # noqa: E402
from radixserve.executor.embedding_runner import EmbeddingRunner  # noqa: E402
from radixserve.executor.model_config import ModelConfig  # noqa: E402
from radixserve.executor.models.gemma import GELU, GEMMA1_GELU, gelu_approximation  # noqa: E402
from radixserve.executor.models.gemma2 import is_sliding_layer  # noqa: E402
from radixserve.executor.models.gemma3 import gemma3_rope  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.hf_parity import (  # noqa: E402
    ATOL,
    VOCAB,
    build_hf_model,
    check_batched_prefill_decode_and_prefix_reuse,
    check_chunked_prefill,
    check_greedy_matches_hf_generate,
)
from tests.tp_ranks import GREEDY_TOKENS, build_runner, on_cpu, run_group, scenario  # noqa: E402

WINDOW = 8
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

CONFIGS = {
    "mistral": lambda: transformers.MistralConfig(
        **TINY, sliding_window=WINDOW, tie_word_embeddings=False
    ),
    # head_dim 32: q width 128 != hidden 64; one kv head
    "gemma": lambda: transformers.GemmaConfig(**{**TINY, "num_key_value_heads": 1}, head_dim=32),
    # layer 0 sliding, layer 1 global (the default pattern); caps low enough to bite
    "gemma2": lambda: transformers.Gemma2Config(
        **TINY,
        head_dim=32,
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=8.0,
    ),
    "gemma3": lambda **caps: transformers.Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 3},
        **caps,
        head_dim=32,
        sliding_window=WINDOW,
        query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 2.0},
        },
    ),
}


def hf_and_runner(config: str, folder, backend: str):
    hf = build_hf_model(CONFIGS[config](), folder)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    runner = ModelRunner(
        folder,
        runner_config(
            dtype="float32", device=device, max_total_tokens=1024, attention_backend=backend
        ),
    )
    return hf, runner


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    return hf_and_runner(request.param, tmp_path_factory.mktemp(request.param), "torch_native")


def test_batched_prefill_decode_and_prefix_reuse(models):
    check_batched_prefill_decode_and_prefix_reuse(models)


def test_chunked_prefill(models):
    check_chunked_prefill(models)


def test_greedy_matches_hf_generate(models):
    check_greedy_matches_hf_generate(models)


def test_gemma2_on_the_triton_kernels(tmp_path):
    # One case under the interpreter (slow): windowed and soft-capped extend with and without a
    # prefix, and batched decode, through the paged kernels.
    check_batched_prefill_decode_and_prefix_reuse(hf_and_runner("gemma2", tmp_path, "triton"))


def test_layers_get_their_window_softcap_and_rotary(models):
    hf, runner = models
    model = runner.model
    attns = [layer.self_attn.attn for layer in model.model.layers]
    for i, attn in enumerate(attns):
        hf_attn = hf.model.layers[i].self_attn
        if isinstance(hf, transformers.MistralForCausalLM):  # HF: the config's, on every layer
            expected = hf.config.sliding_window
        else:  # HF's Gemma 2 / 3 modules hold the window where it applies
            expected = getattr(hf_attn, "sliding_window", None)
        assert attn.sliding_window == expected
        assert attn.logit_softcap == getattr(hf_attn, "attn_logit_softcapping", None)
        assert attn.scaling == pytest.approx(hf_attn.scaling)
    if type(hf).__name__ == "Gemma3ForCausalLM":
        assert not torch.equal(model.rotary_emb.cos_table, model.local_rotary_emb.cos_table)


def test_mistral_window_past_the_context_is_dropped(tmp_path):
    # A window no sequence can outgrow masks nothing: the layers run without one (fast paths stay).
    build_hf_model(transformers.MistralConfig(**TINY, sliding_window=4096), tmp_path)
    from radixserve.executor.models.mistral import MistralForCausalLM

    model = MistralForCausalLM(ModelConfig.load(tmp_path, "float32"))
    assert all(layer.self_attn.attn.sliding_window is None for layer in model.model.layers)


def test_sliding_layers_rope_and_activation_from_older_config_keys():
    # Gemma 1 configs say "gelu" for the tanh form (as transformers reads them); Gemma 2 / 3 mean it.
    assert gelu_approximation("gelu", GEMMA1_GELU) == "tanh"
    assert gelu_approximation("gelu", GELU) == "none"
    with pytest.raises(ValueError, match="relu"):
        gelu_approximation("relu", GELU)
    legacy = ModelConfig(None, {"num_hidden_layers": 12}, "Gemma3ForCausalLM", torch.float32, 512)
    assert [is_sliding_layer(legacy, i, 6) for i in range(12)] == ([True] * 5 + [False]) * 2
    assert [is_sliding_layer(legacy, i, 2) for i in range(4)] == [True, False, True, False]
    hf = {
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }
    assert gemma3_rope(hf, "sliding_attention") == (1e4, {"rope_type": "default"})
    theta, scaling = gemma3_rope(hf, "full_attention")
    assert theta == 1e6 and scaling["rope_type"] == "linear" and scaling["factor"] == 8.0


def test_two_shards_match_one(tmp_path):
    # Gemma 3 with Gemma 2's soft-caps: every Gemma module (and the sliding window) sharded at once.
    # Tolerance hf_parity.ATOL, not tp_ranks.ATOL (1e-5): the shards' sums in another order differ
    # by up to 1.1e-5 here, the hidden states being larger (embeddings times sqrt(hidden)).
    build_hf_model(
        CONFIGS["gemma3"](attn_logit_softcapping=3.0, final_logit_softcapping=8.0),
        tmp_path / "model",
    )
    expected = on_cpu(scenario(build_runner(str(tmp_path / "model"))))
    got = run_group(tmp_path / "model", tmp_path / "tp2.pt")
    for part in ("prefill", "decode", "chunked"):
        torch.testing.assert_close(got[part], expected[part], atol=ATOL, rtol=ATOL, msg=part)
    assert len(got["greedy"]) == GREEDY_TOKENS and got["greedy"] == expected["greedy"]


def test_gemma2_as_an_embedder_keeps_window_and_caps(tmp_path):
    # The no-KV-cache backend (--is-embedding) masks and caps like the paged ones.
    hf = build_hf_model(CONFIGS["gemma2"](), tmp_path)
    runner = EmbeddingRunner.from_args(
        ServerArgs(model_path=str(tmp_path), is_embedding=True, dtype="float32", device="cpu")
    )
    sequences = [list(range(3, 23)), [7, 9, 11]]
    out = runner.embed(sequences)
    with torch.no_grad():
        expected = torch.stack(
            [hf.model(torch.tensor([ids])).last_hidden_state[0, -1] for ids in sequences]
        )
    torch.testing.assert_close(out.vectors, F.normalize(expected, dim=1), atol=1e-5, rtol=1e-5)
