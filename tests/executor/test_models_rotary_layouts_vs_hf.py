"""StableLM, Cohere (Command-R) and GLM against transformers on tiny random fp32 models: prefill, decode
and prefix reuse, chunked prefill, 32 greedy tokens on the torch_native backend; the triton backend
(under TRITON_INTERPRET=1 without CUDA) on GLM's partial interleaved rotary; each model on two
tensor-parallel shards (gloo) equal to one (GLM's through ChatGLM, test_chatglm_vs_reference.py). Their rotaries (partial, interleaved) load as a permutation of each q/k head
(layers/rotary.py RotaryLayout), which the first tests check against the reference rotations.

Tolerance: logits agree to atol 1e-4 (hf_parity.ATOL; fp32, the differences come from op order).
"""

import os

import pytest
import torch
import transformers

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.executor.layers.rotary import RotaryEmbedding, RotaryLayout  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.hf_parity import (  # noqa: E402
    VOCAB,
    build_hf_model,
    check_batched_prefill_decode_and_prefix_reuse,
    check_chunked_prefill,
    check_greedy_matches_hf_generate,
)
from tests.tp_ranks import ATOL as TP_ATOL  # noqa: E402
from tests.tp_ranks import GREEDY_TOKENS, build_runner, on_cpu, run_group, scenario  # noqa: E402

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
)

CONFIGS = {
    # partial rotary over 4 of 16 dims; q/k/v biases; a LayerNorm per q and k head (one KV head)
    "stablelm_qknorm": lambda: transformers.StableLmConfig(
        **TINY,
        num_key_value_heads=1,
        use_qkv_bias=True,
        qk_layernorm=True,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
        },
    ),
    # parallel residual (no post-attention LayerNorm), half the head rotating, tied embeddings
    "stablelm_parallel": lambda: transformers.StableLmConfig(
        **TINY,
        num_key_value_heads=2,
        use_parallel_residual=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
    ),
    # interleaved rotary over the whole head, logit_scale, q/k norms, biases, tied embeddings
    "cohere_qknorm": lambda: transformers.CohereConfig(
        **TINY,
        num_key_value_heads=2,
        use_qk_norm=True,
        attention_bias=True,
        logit_scale=0.25,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    ),
    # interleaved pairs on the first half of each 32-dim head, q/k/v biases, fused gate_up
    "glm": lambda: transformers.GlmConfig(
        **TINY,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
    ),
}
# GLM's TP path (split gate_up, permuted q/k rows) is ChatGLM's: test_chatglm_vs_reference runs it.
TP_CASES = ("stablelm_qknorm", "cohere_qknorm")


# --- the rotary layouts ----------------------------------------------------------------------------


def reference_rotation(x, positions, rotary_dim, interleaved, theta):
    """The checkpoint's rotation of x [T, heads, head_dim]: its first rotary_dim dims in pairs
    (j, j + rotary_dim/2), or (2j, 2j+1) when interleaved, the rest unchanged."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angle = (positions.float()[:, None, None] * inv_freq).double()  # [T, 1, pairs], as HF's
    rot, rest = x[..., :rotary_dim].double(), x[..., rotary_dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:
        a, b = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    a2, b2 = a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()
    rot = torch.stack((a2, b2), -1).flatten(-2) if interleaved else torch.cat((a2, b2), -1)
    return torch.cat((rot.to(x.dtype), rest), -1)


@pytest.mark.parametrize(
    "head_dim, rotary_dim, interleaved",
    [(16, 4, False), (16, 8, True), (16, 16, True), (32, 16, True), (16, 16, False)],
)
def test_permuted_heads_rotate_like_the_checkpoint_layout(head_dim, rotary_dim, interleaved):
    torch.manual_seed(0)
    layout = RotaryLayout(head_dim, rotary_dim, interleaved)
    assert sorted(layout.perm.tolist()) == list(range(head_dim))
    assert layout.identity == (rotary_dim == head_dim and not interleaved)
    rope = RotaryEmbedding(head_dim, 64, 100.0, {"rope_type": "default"}, torch.float64, rotary_dim)
    positions = torch.tensor([0, 3, 17, 63])
    q, k = torch.randn(2, 4, 3, head_dim, dtype=torch.float64)
    expected_q = reference_rotation(q, positions, rotary_dim, interleaved, 100.0)
    expected_k = reference_rotation(k, positions, rotary_dim, interleaved, 100.0)
    # The q projection's rows permuted per head give the permuted q; the backends rotate it whole.
    got_q = rope.prepare(positions).rotate(layout.permute_last(q), 3)
    # (our tables hold float32 cos/sin: 1e-6)
    torch.testing.assert_close(got_q, layout.permute_last(expected_q), atol=1e-6, rtol=1e-6)
    got_k = rope.prepare(positions).rotate(layout.permute_last(k), 3)
    # Attention scores are those of the checkpoint's layout.
    torch.testing.assert_close(
        torch.einsum("tqd,skd->tsqk", got_q, got_k),
        torch.einsum("tqd,skd->tsqk", expected_q, expected_k),
        atol=1e-5,
        rtol=1e-6,
    )
    weight = torch.randn(3 * head_dim, 5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(
        layout.permute_rows(weight) @ x,
        layout.permute_last((weight @ x).view(3, head_dim)).flatten(),
    )


def test_quantized_q_rows_with_a_permuted_layout_are_refused():
    layout = RotaryLayout(16, 8, True)
    weights = [("model.layers.0.self_attn.q_proj.qweight", torch.zeros(8, 8, dtype=torch.int32))]
    with pytest.raises(NotImplementedError, match="q_proj.qweight"):
        list(layout.permute_checkpoint(weights, (".q_proj.",)))


# --- parity with transformers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """(hf model, folder) of each config, built once."""
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            built[name] = (build_hf_model(CONFIGS[name](), folder), folder)
        return built[name]

    return get


ALL_CHECKS = (
    check_batched_prefill_decode_and_prefix_reuse,
    check_chunked_prefill,
    check_greedy_matches_hf_generate,
)
# (config, attention backend, checks): the whole set once per model; the others cover one feature more
# (the parallel residual of StableLM; the triton kernels on the partial interleaved rotary) cheaply.
CASES = {
    "stablelm_qknorm-torch_native": ("stablelm_qknorm", "torch_native", ALL_CHECKS),
    "stablelm_parallel-torch_native": ("stablelm_parallel", "torch_native", ALL_CHECKS[:1]),
    "cohere_qknorm-torch_native": ("cohere_qknorm", "torch_native", ALL_CHECKS),
    "glm-torch_native": ("glm", "torch_native", ALL_CHECKS),
    "glm-triton": ("glm", "triton", ALL_CHECKS[:2]),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_hf(case, hf_folders):
    config, backend, checks = CASES[case]
    hf, folder = hf_folders(config)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    runner = ModelRunner(
        folder,
        runner_config(
            dtype="float32", device=device, max_total_tokens=1024, attention_backend=backend
        ),
    )
    for check in checks:
        check((hf, runner))


# --- tensor parallel -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", TP_CASES)
def test_two_shards_match_one(config, hf_folders, tmp_path):
    _, folder = hf_folders(config)
    expected = on_cpu(scenario(build_runner(str(folder))))
    got = run_group(folder, tmp_path / "tp2.pt")
    for part in ("prefill", "decode", "chunked"):
        torch.testing.assert_close(got[part], expected[part], atol=TP_ATOL, rtol=TP_ATOL, msg=part)
    assert len(got["greedy"]) == GREEDY_TOKENS and got["greedy"] == expected["greedy"]
