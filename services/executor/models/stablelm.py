"""StableLM (StableLM-2, StableLM-3B-4E1T, StableCode): LayerNorms with bias, a partial rotary
(partial_rotary_factor of each head, rotate-half pairs), optional q/k/v biases, an optional LayerNorm
per q and k head (qk_layernorm) and an optional parallel residual (attention and MLP both read the
input LayerNorm's output). LayerNormCausalLM is the frame it shares with Cohere."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

from radixserve.executor.layers.embedding import VocabParallelEmbedding
from radixserve.executor.layers.norm import LayerNorm, PerHeadLayerNorm
from radixserve.executor.layers.rotary import RopeStep, RotaryLayout, partial_rotary_dim
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    add_rotary_and_lm_head,
)
from radixserve.executor.models.qwen3_moe import QKNormAttention
from radixserve.executor.parallel_state import tp_rank

QK_ROWS = (".q_proj.", ".k_proj.")
QK_NORMS = (".q_norm.", ".k_norm.")


class PerHeadNormAttention(QKNormAttention):
    """Attention with a LayerNorm of its own (weight only) on each q and k head before the rotary."""

    def __init__(
        self, config: ModelConfig, layer_id: int, qkv_bias: bool, o_bias: bool, eps: float
    ):
        super().__init__(config, layer_id, qkv_bias, o_bias)
        d = self.head_dim
        k_first = tp_rank() // self.qkv_proj.kv_replicas * self.num_kv_heads
        self.q_norm = PerHeadLayerNorm(self.num_heads, d, eps, tp_rank() * self.num_heads)
        self.k_norm = PerHeadLayerNorm(self.num_kv_heads, d, eps, k_first)


class LayerNormDecoderLayer(nn.Module):
    """x + attn(ln1(x)) then + mlp(ln2(.)); or, with a parallel residual, x + attn(ln1(x)) + mlp(ln1(x))."""

    def __init__(self, config: ModelConfig, attention: nn.Module, norm_bias: bool, parallel: bool):
        super().__init__()
        hidden, eps = config.get("hidden_size"), config.get("layer_norm_eps", 1e-5)
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.get('hidden_act')!r} is not supported")
        self.self_attn = attention
        self.mlp = LlamaMLP(hidden, config.get("intermediate_size"), bias=False)
        self.input_layernorm = LayerNorm(hidden, eps, norm_bias)
        self.post_attention_layernorm = None if parallel else LayerNorm(hidden, eps, norm_bias)

    def forward(self, x: torch.Tensor, rope: RopeStep) -> torch.Tensor:
        h = self.input_layernorm(x)
        a = self.self_attn(h, rope)
        if self.post_attention_layernorm is None:
            return x + a + self.mlp(h)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class LayerNormCausalLM(nn.Module):
    """A decoder of LayerNormDecoderLayers with Llama's projections, checkpoint names and LM head; the
    checkpoint's q/k heads are permuted into our rotary layout while loading (layers/rotary.py)."""

    stacked_params = LlamaForCausalLM.stacked_params
    checkpoint_renames = LlamaForCausalLM.checkpoint_renames
    norm_bias = True
    interleaved_rotary = False
    default_rotary_factor = 1.0

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        hidden = config.get("hidden_size")
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden)
        self.model.layers = nn.ModuleList(
            LayerNormDecoderLayer(
                config, self.make_attention(config, i), self.norm_bias, self.parallel(config)
            )
            for i in range(config.num_layers)
        )
        self.model.norm = LayerNorm(hidden, config.get("layer_norm_eps", 1e-5), self.norm_bias)
        rotary_dim = partial_rotary_dim(config.hf, config.head_dim, self.default_rotary_factor)
        self.rotary_layout = RotaryLayout(config.head_dim, rotary_dim, self.interleaved_rotary)
        add_rotary_and_lm_head(self, config, rotary_dim)

    def make_attention(self, config: ModelConfig, layer_id: int) -> nn.Module:
        raise NotImplementedError

    def parallel(self, config: ModelConfig) -> bool:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rope = self.rotary_emb.prepare(positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, rope)
        return self.model.norm(x)

    compute_logits = LlamaForCausalLM.compute_logits

    def checkpoint_names(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors under the names this model loads (Llama's, plus q_norm/k_norm)."""
        return iter(weights)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        ours = self.rotary_layout.permute_checkpoint(
            self.checkpoint_names(weights), QK_ROWS, QK_NORMS
        )
        LlamaForCausalLM.load_weights(self, ours)


_HEAD_NORM = re.compile(r"(.*\.self_attn\.)([qk])_layernorm\.norms\.(\d+)\.weight$")


class StableLmForCausalLM(LayerNormCausalLM):
    default_rotary_factor = 0.25  # HF's StableLmConfig default

    def make_attention(self, config: ModelConfig, layer_id: int) -> nn.Module:
        bias = bool(config.get("use_qkv_bias", False))
        if config.get("qk_layernorm", False):
            eps = config.get("layer_norm_eps", 1e-5)
            return PerHeadNormAttention(config, layer_id, bias, False, eps)
        return LlamaAttention(config, layer_id, bias, False)

    def parallel(self, config: ModelConfig) -> bool:
        return bool(config.get("use_parallel_residual", False))

    def checkpoint_names(self, weights):
        """StableLM stores one LayerNorm per head (`q_layernorm.norms.N.weight`): stacked into one
        [heads, head_dim] q_norm / k_norm weight once all of a layer's heads have come."""
        heads = {"q": self.config.num_heads, "k": self.config.num_kv_heads}
        pending: dict[str, dict[int, torch.Tensor]] = {}
        for name, tensor in weights:
            m = _HEAD_NORM.match(name)
            if m is None:
                yield name, tensor
                continue
            stacked = f"{m[1]}{m[2]}_norm.weight"
            got = pending.setdefault(stacked, {})
            got[int(m[3])] = tensor
            if len(got) == heads[m[2]]:
                yield stacked, torch.stack([got[h] for h in range(len(got))])
                del pending[stacked]
        if pending:
            raise ValueError(f"checkpoint lacks per-head norms of {sorted(pending)[:4]}")
