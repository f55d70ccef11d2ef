"""ChatGLM2/3 / GLM-4 chat (remote code: no class in transformers) against a plain-torch reference forward
written here from the published modelling code's semantics (modeling_chatglm.py), on a random fp32
checkpoint saved under the published tensor names: prefill, decode and prefix reuse, chunked prefill,
32 greedy tokens on torch_native; two tensor-parallel shards (gloo) equal to one.

Tolerance: logits agree to atol 1e-4 (hf_parity.ATOL).
"""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.chatglm import ChatGLMForCausalLM
from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from tests.executor.hf_parity import (
    VOCAB,
    check_batched_prefill_decode_and_prefix_reuse,
    check_chunked_prefill,
    check_greedy_matches_hf_generate,
)
from tests.tp_ranks import ATOL as TP_ATOL
from tests.tp_ranks import GREEDY_TOKENS, build_runner, on_cpu, run_group, scenario

CONFIG = {
    "architectures": ["ChatGLMModel"],
    "model_type": "chatglm",
    "torch_dtype": "float32",
    "num_layers": 2,
    "padded_vocab_size": VOCAB,
    "hidden_size": 64,
    "ffn_hidden_size": 96,
    "kv_channels": 16,
    "num_attention_heads": 4,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "seq_length": 512,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "rope_ratio": 2,
}


def random_checkpoint(cfg: dict, folder) -> dict[str, torch.Tensor]:
    """Random weights under the published names, saved with cfg as the model folder."""
    g = torch.Generator().manual_seed(0)
    hidden, d, heads = cfg["hidden_size"], cfg["kv_channels"], cfg["num_attention_heads"]
    groups = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    qkv_rows = (heads + 2 * groups) * d

    def w(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def norm():
        return torch.rand(hidden, generator=g) + 0.5

    t = {
        "transformer.embedding.word_embeddings.weight": w(
            cfg["padded_vocab_size"], hidden, std=1.0
        ),
        "transformer.rotary_pos_emb.inv_freq": torch.ones(d // 4),  # a buffer, not loaded
        "transformer.encoder.final_layernorm.weight": norm(),
        "transformer.output_layer.weight": w(cfg["padded_vocab_size"], hidden),
    }
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        t[p + "input_layernorm.weight"] = norm()
        t[p + "self_attention.query_key_value.weight"] = w(qkv_rows, hidden)
        t[p + "self_attention.query_key_value.bias"] = w(qkv_rows)
        t[p + "self_attention.dense.weight"] = w(hidden, heads * d)
        t[p + "post_attention_layernorm.weight"] = norm()
        t[p + "mlp.dense_h_to_4h.weight"] = w(2 * cfg["ffn_hidden_size"], hidden)
        t[p + "mlp.dense_4h_to_h.weight"] = w(hidden, cfg["ffn_hidden_size"])
        if cfg["add_bias_linear"]:
            t[p + "self_attention.dense.bias"] = w(hidden)
            t[p + "mlp.dense_h_to_4h.bias"] = w(2 * cfg["ffn_hidden_size"])
            t[p + "mlp.dense_4h_to_h.bias"] = w(hidden)
    save_file(t, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return t


class Reference:
    """ChatGLM's forward over the whole sequence (no cache), with the interface hf_parity's checks use."""

    def __init__(self, cfg: dict, t: dict[str, torch.Tensor]):
        self.cfg, self.t = cfg, t

    def rms(self, x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rope(self, x, base):
        """The first half of each head rotates in pairs (2j, 2j+1), the frequencies over that half."""
        n = x.shape[-1] // 2
        theta = 1.0 / (base ** (torch.arange(0, n, 2, dtype=torch.float) / n))
        angle = torch.outer(torch.arange(x.shape[0], dtype=torch.float), theta)[:, None]
        cos, sin = angle.cos(), angle.sin()
        rot, rest = x[..., :n], x[..., n:]
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((a * cos - b * sin, b * cos + a * sin), -1).flatten(-2)
        return torch.cat((rot, rest), -1)

    def logits(self, ids: list[int]) -> torch.Tensor:
        cfg, t = self.cfg, self.t
        d, heads = cfg["kv_channels"], cfg["num_attention_heads"]
        groups = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
        n = len(ids)
        x = t["transformer.embedding.word_embeddings.weight"][ids]
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        for i in range(cfg["num_layers"]):
            p = f"transformer.encoder.layers.{i}."
            h = self.rms(x, t[p + "input_layernorm.weight"])
            qkv = F.linear(
                h,
                t[p + "self_attention.query_key_value.weight"],
                t[p + "self_attention.query_key_value.bias"],
            )
            if cfg["multi_query_attention"]:
                q, k, v = qkv.split([heads * d, groups * d, groups * d], -1)
                q, k, v = q.view(n, heads, d), k.view(n, groups, d), v.view(n, groups, d)
            else:  # per head [q | k | v]
                q, k, v = qkv.view(n, heads, 3 * d).split(d, -1)
            base = 10000 * cfg["rope_ratio"]
            q, k = self.rope(q, base), self.rope(k, base)
            k = k.repeat_interleave(heads // groups, 1)
            v = v.repeat_interleave(heads // groups, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            o = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * d)
            x = x + F.linear(
                o, t[p + "self_attention.dense.weight"], t.get(p + "self_attention.dense.bias")
            )
            h = self.rms(x, t[p + "post_attention_layernorm.weight"])
            gate, up = F.linear(
                h, t[p + "mlp.dense_h_to_4h.weight"], t.get(p + "mlp.dense_h_to_4h.bias")
            ).chunk(2, -1)
            x = x + F.linear(
                F.silu(gate) * up,
                t[p + "mlp.dense_4h_to_h.weight"],
                t.get(p + "mlp.dense_4h_to_h.bias"),
            )
        x = self.rms(x, t["transformer.encoder.final_layernorm.weight"])
        return F.linear(x, t["transformer.output_layer.weight"])

    def __call__(self, input_ids: torch.Tensor):
        return SimpleNamespace(logits=self.logits(input_ids[0].tolist())[None])

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_):
        ids = input_ids[0].tolist()
        for _ in range(max_new_tokens):
            ids.append(int(self.logits(ids)[-1].argmax()))
        return torch.tensor([ids])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(reference, folder) for the grouped-query config and one without multi-query groups."""
    out = {}
    for name, cfg in (
        ("grouped", CONFIG),
        ("per_head_qkv", {**CONFIG, "multi_query_attention": False, "add_bias_linear": True}),
    ):
        folder = tmp_path_factory.mktemp(name)
        out[name] = (Reference(cfg, random_checkpoint(cfg, folder)), folder)
    return out


def cpu_runner(folder) -> ModelRunner:
    return ModelRunner(folder, runner_config(dtype="float32", device="cpu", max_total_tokens=1024))


def test_reference_rotation_is_glm_hf_layout():
    """The reference's rotary is transformers' GLM one (partial 0.5, interleaved) at base 10000 * ratio."""
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

    x = torch.randn(5, 3, 16)
    inv = 1.0 / (20000 ** (torch.arange(0, 8, 2).float() / 8))
    freqs = torch.outer(torch.arange(5).float(), inv)
    emb = torch.cat((freqs, freqs), -1)
    expected, _ = apply_rotary_pos_emb(
        x.transpose(0, 1)[None], x.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    got = Reference(CONFIG, {}).rope(x, 20000)
    torch.testing.assert_close(got, expected[0].transpose(0, 1))


def test_matches_reference(folders):
    ref, folder = folders["grouped"]
    runner = cpu_runner(folder)
    assert runner.config.context_length == 512  # seq_length
    for check in (
        check_batched_prefill_decode_and_prefix_reuse,
        check_chunked_prefill,
        check_greedy_matches_hf_generate,
    ):
        check((ref, runner))


def test_per_head_qkv_layout_matches_reference(folders):
    ref, folder = folders["per_head_qkv"]
    check_batched_prefill_decode_and_prefix_reuse((ref, cpu_runner(folder)))


def test_two_shards_match_one(folders, tmp_path):
    _, folder = folders["grouped"]
    expected = on_cpu(scenario(build_runner(str(folder))))
    got = run_group(folder, tmp_path / "tp2.pt")
    for part in ("prefill", "decode", "chunked"):
        torch.testing.assert_close(got[part], expected[part], atol=TP_ATOL, rtol=TP_ATOL, msg=part)
    assert len(got["greedy"]) == GREEDY_TOKENS and got["greedy"] == expected["greedy"]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"position_encoding_2d": True, "vocab_size": VOCAB}, "first ChatGLM-6B"),
        ({**CONFIG, "rmsnorm": False}, "rmsnorm=False"),
        ({**CONFIG, "apply_residual_connection_post_layernorm": True}, "apply_residual"),
    ],
)
def test_layouts_it_does_not_implement_are_refused(config, message, tmp_path):
    cfg = ModelConfig(tmp_path, dict(config), "ChatGLMModel", torch.float32, 512)
    with pytest.raises(ValueError, match=message):
        ChatGLMForCausalLM(cfg)
