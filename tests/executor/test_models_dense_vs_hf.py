"""Dense Llama variants against a reference, on tiny random models in fp32: Qwen3, OLMo, OLMo 2, Phi-3
(LongRoPE) and Mistral NeMo's geometry (head_dim != hidden / heads) against transformers; EXAONE and
InternLM2 (remote code only) against a plain-torch forward written here from their published modelling
code, over a checkpoint with their published tensor names. Prefill / decode / prefix reuse, chunked
prefill and 32 greedy tokens with the torch_native backend; batched prefill and decode of Phi-3 also with
triton (TRITON_INTERPRET=1 without CUDA); every model once more under TP=2 on CPU (gloo), equal to TP=1.

Tolerance: logits agree to atol 1e-4 (fp32; the differences come from op order); TP=2 to 1e-5.
"""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.executor.layers.rotary import RotaryEmbedding, rope_settings  # noqa: E402
from radixserve.executor.model_config import ModelConfig  # noqa: E402
from radixserve.executor.models.internlm2 import InternLM2ForCausalLM  # noqa: E402
from radixserve.executor.models.phi3 import Phi3ForCausalLM  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.dense_tp_ranks import run_models_on_two_ranks  # noqa: E402
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput  # noqa: E402
from tests.executor.hf_parity import (  # noqa: E402
    VOCAB,
    build_hf_model,
    check_batched_prefill_decode_and_prefix_reuse,
    check_chunked_prefill,
    check_greedy_matches_hf_generate,
    prompts,
)
from tests.tp_ranks import ATOL, GREEDY_TOKENS, build_runner, on_cpu, scenario  # noqa: E402

GEOMETRY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0 + 0.25 * i for i in range(8)],
    "long_factor": [2.0 + i for i in range(8)],
    # the tests' sequences stay inside it (short factors); the attention factor is that of 512 / 64
    "original_max_position_embeddings": 64,
}

HF_CONFIGS = {
    # head_dim 32 (q width 128 != hidden 64); biases on q, k, v and o
    "qwen3": lambda: transformers.Qwen3Config(
        **GEOMETRY, head_dim=32, attention_bias=True, tie_word_embeddings=False
    ),
    # q, k and v clamped to +-1 (many of them are larger with these weights); tied embeddings
    "olmo": lambda: transformers.OlmoConfig(**GEOMETRY, clip_qkv=1.0, tie_word_embeddings=True),
    "olmo2": lambda: transformers.Olmo2Config(**GEOMETRY, tie_word_embeddings=False),
    "phi3": lambda: transformers.Phi3Config(
        **GEOMETRY,
        original_max_position_embeddings=64,
        rope_parameters=dict(LONGROPE),
        pad_token_id=0,
    ),
    # Mistral NeMo's geometry: head_dim 32 with hidden 64 and 4 heads
    "mistral_nemo": lambda: transformers.MistralConfig(
        **GEOMETRY, head_dim=32, sliding_window=None, tie_word_embeddings=False
    ),
}


# --- remote-code architectures: checkpoint writers and a torch reference --------------------------

REMOTE = dict(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, theta=10000.0, eps=1e-5)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


class RemoteCodeReference:
    """The forward of a Llama-shaped remote-code model (pre-RMSNorm, rotate-half rope, GQA, SiLU-gated
    MLP) over its checkpoint tensors, named the way its modelling code names them; `qkv(self, layer, x)` and
    `names` are the architecture's. Called like an HF model (`.logits`) and greedy `generate` without a
    cache (the whole sequence each step)."""

    def __init__(self, tensors: dict, names: dict, qkv):
        self.t, self.names, self.qkv = tensors, names, qkv
        d = REMOTE["hidden"] // REMOTE["heads"]
        self.inv_freq = 1.0 / (REMOTE["theta"] ** (torch.arange(0, d, 2).float() / d))

    def w(self, key: str, layer: int | None = None) -> torch.Tensor:
        return self.t[self.names[key].format(i=layer)]

    def logits(self, ids: list[int]) -> torch.Tensor:
        eps, heads, kv_heads = REMOTE["eps"], REMOTE["heads"], REMOTE["kv_heads"]
        x = self.w("embed")[torch.tensor(ids)]
        angles = torch.arange(len(ids)).float()[:, None] * self.inv_freq[None]
        cos, sin = torch.cat((angles.cos(),) * 2, -1), torch.cat((angles.sin(),) * 2, -1)
        for i in range(REMOTE["layers"]):
            q, k, v = self.qkv(self, i, _rms_norm(x, self.w("attn_norm", i), eps))
            q, k = (
                q * cos[:, None] + _rotate_half(q) * sin[:, None],
                k * cos[:, None] + _rotate_half(k) * sin[:, None],
            )
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
            )
            x = x + self.linear(o.transpose(0, 1).reshape(len(ids), -1), "o", i)
            h = _rms_norm(x, self.w("mlp_norm", i), eps)
            x = x + F.linear(
                F.silu(F.linear(h, self.w("gate", i))) * F.linear(h, self.w("up", i)),
                self.w("down", i),
            )
        return F.linear(_rms_norm(x, self.w("norm"), eps), self.w("head"))

    def linear(self, x: torch.Tensor, key: str, layer: int) -> torch.Tensor:
        bias = self.t.get(self.names[key].format(i=layer).replace(".weight", ".bias"))
        return F.linear(x, self.w(key, layer), bias)

    def __call__(self, ids: torch.Tensor):
        return SimpleNamespace(logits=self.logits(ids[0].tolist())[None])

    def generate(self, ids: torch.Tensor, max_new_tokens: int, **_) -> torch.Tensor:
        seq = ids[0].tolist()
        for _ in range(max_new_tokens):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return torch.tensor([seq])


def _exaone_qkv(ref: RemoteCodeReference, i: int, h: torch.Tensor):
    d = REMOTE["hidden"] // REMOTE["heads"]
    return (ref.linear(h, proj, i).view(h.shape[0], -1, d) for proj in ("q", "k", "v"))


def _internlm2_qkv(ref: RemoteCodeReference, i: int, h: torch.Tensor):
    """InternLM2's wqkv output viewed as [T, kv_heads, q_per_kv + 2, head_dim]: each KV head's group of
    q heads, then its k and its v."""
    d, groups = REMOTE["hidden"] // REMOTE["heads"], REMOTE["heads"] // REMOTE["kv_heads"]
    qkv = ref.linear(h, "qkv", i).view(h.shape[0], REMOTE["kv_heads"], groups + 2, d)
    return qkv[:, :, :groups].reshape(h.shape[0], -1, d), qkv[:, :, -2], qkv[:, :, -1]


def _exaone_checkpoint() -> tuple[dict, dict, dict]:
    d, kv = REMOTE["hidden"] // REMOTE["heads"], REMOTE["kv_heads"]
    hidden, inter = REMOTE["hidden"], REMOTE["inter"]
    layer = "transformer.h.{i}."
    names = {
        "embed": "transformer.wte.weight",
        "attn_norm": layer + "ln_1.weight",
        "q": layer + "attn.attention.q_proj.weight",
        "k": layer + "attn.attention.k_proj.weight",
        "v": layer + "attn.attention.v_proj.weight",
        "o": layer + "attn.attention.out_proj.weight",
        "mlp_norm": layer + "ln_2.weight",
        "gate": layer + "mlp.c_fc_0.weight",
        "up": layer + "mlp.c_fc_1.weight",
        "down": layer + "mlp.c_proj.weight",
        "norm": "transformer.ln_f.weight",
        "head": "transformer.wte.weight",  # tied
    }
    shapes = {
        "attn_norm": (hidden,),
        "q": (hidden, hidden),
        "k": (kv * d, hidden),
        "v": (kv * d, hidden),
        "o": (hidden, hidden),
        "mlp_norm": (hidden,),
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }
    config = {
        "architectures": ["ExaoneForCausalLM"],
        "model_type": "exaone",
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_layers": REMOTE["layers"],
        "num_attention_heads": REMOTE["heads"],
        "num_key_value_heads": kv,
        "activation_function": "silu",
        "layer_norm_epsilon": REMOTE["eps"],
        "rope_theta": REMOTE["theta"],
        "rope_scaling": None,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }
    return names, shapes, config


def _internlm2_checkpoint() -> tuple[dict, dict, dict]:
    d, kv = REMOTE["hidden"] // REMOTE["heads"], REMOTE["kv_heads"]
    hidden, inter = REMOTE["hidden"], REMOTE["inter"]
    layer = "model.layers.{i}."
    names = {
        "embed": "model.tok_embeddings.weight",
        "attn_norm": layer + "attention_norm.weight",
        "qkv": layer + "attention.wqkv.weight",
        "qkv_bias": layer + "attention.wqkv.bias",
        "o": layer + "attention.wo.weight",
        "o_bias": layer + "attention.wo.bias",
        "mlp_norm": layer + "ffn_norm.weight",
        "gate": layer + "feed_forward.w1.weight",
        "up": layer + "feed_forward.w3.weight",
        "down": layer + "feed_forward.w2.weight",
        "norm": "model.norm.weight",
        "head": "output.weight",
    }
    qkv_rows = (REMOTE["heads"] + 2 * kv) * d
    shapes = {
        "attn_norm": (hidden,),
        "qkv": (qkv_rows, hidden),
        "qkv_bias": (qkv_rows,),
        "o": (hidden, hidden),
        "o_bias": (hidden,),
        "mlp_norm": (hidden,),
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": REMOTE["layers"],
        "num_attention_heads": REMOTE["heads"],
        "num_key_value_heads": kv,
        "hidden_act": "silu",
        "rms_norm_eps": REMOTE["eps"],
        "rope_theta": REMOTE["theta"],
        # as InternLM2.5-7B-chat: no change within max_position_embeddings
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "max_position_embeddings": 512,
        "bias": True,
        "tie_word_embeddings": False,
    }
    return names, shapes, config


REMOTE_ARCHS = {
    "exaone": (_exaone_checkpoint, _exaone_qkv),
    "internlm2": (_internlm2_checkpoint, _internlm2_qkv),
}


def build_remote_model(arch: str, folder) -> RemoteCodeReference:
    """A random checkpoint with the architecture's published tensor names and config keys, saved to
    folder; its reference forward."""
    make, qkv = REMOTE_ARCHS[arch]
    names, shapes, config = make()
    g = torch.Generator().manual_seed(0)
    tensors = {
        names["embed"]: torch.randn(VOCAB, REMOTE["hidden"], generator=g),
        names["norm"]: torch.rand(REMOTE["hidden"], generator=g) + 0.5,
    }
    if names["head"] not in tensors:
        tensors[names["head"]] = torch.randn(VOCAB, REMOTE["hidden"], generator=g) * 0.1
    for i in range(REMOTE["layers"]):
        for key, shape in shapes.items():
            norm = key.endswith("norm")
            value = (
                torch.rand(shape, generator=g) + 0.5 if norm else torch.randn(shape, generator=g)
            )
            tensors[names[key].format(i=i)] = value if norm else value * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return RemoteCodeReference(tensors, names, qkv)


def build_any(arch: str, folder):
    if arch in REMOTE_ARCHS:
        return build_remote_model(arch, folder)
    return build_hf_model(HF_CONFIGS[arch](), folder)


# --- parity -----------------------------------------------------------------------------------------


def build_runner_for(folder, backend: str = "torch_native") -> ModelRunner:
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return ModelRunner(
        folder,
        runner_config(
            dtype="float32", device=device, max_total_tokens=1024, attention_backend=backend
        ),
    )


@pytest.fixture(scope="module", params=[*HF_CONFIGS, *REMOTE_ARCHS])
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return build_any(request.param, folder), build_runner_for(folder)


def test_batched_prefill_decode_and_prefix_reuse(models):
    check_batched_prefill_decode_and_prefix_reuse(models)


def test_chunked_prefill(models):
    check_chunked_prefill(models)


def test_greedy_matches_reference_generate(models):
    check_greedy_matches_hf_generate(models)


def test_triton_backend_matches_hf(tmp_path):
    """One small case with the triton backend (slow in the interpreter): Phi-3, whose LongRoPE tables
    with the attention factor the backend reads."""
    hf = build_any("phi3", tmp_path)
    check_batched_prefill_decode_and_prefix_reuse((hf, build_runner_for(tmp_path, "triton")))


def test_two_shards_match_one_for_every_model(tmp_path):
    archs = [*HF_CONFIGS, *REMOTE_ARCHS]
    folders = [tmp_path / a for a in archs]
    for arch, folder in zip(archs, folders):
        build_any(arch, folder)
    got = run_models_on_two_ranks(folders, tmp_path / "tp2.pt")
    for arch, folder in zip(archs, folders):
        expected = on_cpu(scenario(build_runner(str(folder))))
        two = got[str(folder)]
        for part in ("prefill", "decode", "chunked"):
            torch.testing.assert_close(
                two[part], expected[part], atol=ATOL, rtol=ATOL, msg=f"{arch} {part}"
            )
        assert len(two["greedy"]) == GREEDY_TOKENS and two["greedy"] == expected["greedy"], arch


# --- the fused CPU decode path (kernels/cpu_decode.cpp) on the Llama subclasses --------------------


@pytest.mark.parametrize("arch", ["phi3", "internlm2"])
def test_fused_cpu_decode_matches_the_torch_path(arch, tmp_path, monkeypatch):
    """Phi-3 (LongRoPE tables with the attention factor) and InternLM2 (biases on qkv and o) are
    LlamaForCausalLM subclasses, so bf16 decode on the CPU takes the fused kernels: one decode step of
    three sequences against the torch path (bf16 tolerance of tests/kernels/test_kernels_cpu_decode.py)."""
    from radixserve.kernels import cpu_decode

    if cpu_decode.load() is None:
        pytest.skip("CPU decode kernels unavailable (no AVX512-BF16 or no compiler)")
    # head_dim 32, the fused kernels' smallest (the parity geometry's 64 / 4 heads = 16 is not one)
    monkeypatch.setitem(REMOTE, "heads", 2)
    monkeypatch.setitem(REMOTE, "kv_heads", 1)
    if arch == "phi3":
        heads = dict(num_attention_heads=2, num_key_value_heads=1)
        longrope = {
            **LONGROPE,
            "short_factor": [1.0 + 0.125 * i for i in range(16)],
            "long_factor": [2.0 + 0.5 * i for i in range(16)],
        }
        config = transformers.Phi3Config(
            **{**GEOMETRY, **heads},
            original_max_position_embeddings=64,
            rope_parameters=longrope,
            pad_token_id=0,
        )
        build_hf_model(config, tmp_path)
    else:
        build_any(arch, tmp_path)
    logits = {}
    for fused in (True, False):
        monkeypatch.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "1" if fused else "0")
        cpu_decode.reset_for_tests()
        runner = ModelRunner(
            tmp_path, runner_config(dtype="bfloat16", device="cpu", max_total_tokens=1024)
        )
        assert (runner.fast_decode is not None) == fused
        a, b, c = prompts(5, 7, 12, 3)
        runner.step(
            StepInput(
                1,
                new_requests=[
                    NewRequest("a", a, list(range(1, 8))),
                    NewRequest("b", b, list(range(20, 32))),
                    NewRequest("c", c, list(range(40, 43))),
                ],
            )
        )
        cont = [ContinuingRequest(r, [s]) for r, s in (("a", 100), ("b", 101), ("c", 102))]
        logits[fused] = runner.step(StepInput(2, continuing_requests=cont)).logits.float()
    cpu_decode.reset_for_tests()
    ref = logits[False]
    torch.testing.assert_close(logits[True], ref, atol=3e-2 * ref.abs().max().item(), rtol=3e-2)


# --- LongRoPE past the original context, and what is refused ---------------------------------------


def test_longrope_tables_past_the_original_context_use_the_long_factors():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = HF_CONFIGS["phi3"]()
    theta, scaling = rope_settings(hf_config.to_dict())
    rope = RotaryEmbedding(16, 512, theta, scaling, torch.float32)
    for seq_len, rows in ((None, slice(0, 64)), (512, slice(64, 512))):  # short, then long factors
        inv_freq, attention = ROPE_INIT_FUNCTIONS["longrope"](hf_config, seq_len=seq_len)
        assert attention == pytest.approx(math.sqrt(1 + math.log(8) / math.log(64)))
        angles = torch.arange(512).float()[rows, None] * inv_freq[None]
        expected = torch.cat((angles.cos(), angles.cos()), -1) * attention
        torch.testing.assert_close(rope.cos_table[rows], expected, atol=1e-5, rtol=0)
        expected_sin = torch.cat((-angles.sin(), angles.sin()), -1) * attention
        torch.testing.assert_close(rope.sin_table[rows], expected_sin, atol=1e-5, rtol=0)


def _config(arch: str, hf: dict, context_length: int = 512) -> ModelConfig:
    return ModelConfig(
        path=None, hf=hf, architecture=arch, dtype=torch.float32, context_length=context_length
    )


def test_phi3_with_partial_rotary_is_refused():
    hf = {**HF_CONFIGS["phi3"]().to_dict(), "partial_rotary_factor": 0.75}
    hf["rope_parameters"] = {**hf["rope_parameters"], "partial_rotary_factor": 0.75}
    with pytest.raises(ValueError, match="partial_rotary_factor 0.75 is not supported"):
        Phi3ForCausalLM(_config("Phi3ForCausalLM", hf))


def test_internlm2_dynamic_ntk_past_max_position_embeddings_is_refused():
    hf = _internlm2_checkpoint()[2]
    with pytest.raises(ValueError, match="serves contexts up to max_position_embeddings"):
        InternLM2ForCausalLM(_config("InternLM2ForCausalLM", hf, context_length=1024))
