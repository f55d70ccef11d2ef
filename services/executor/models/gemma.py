"""Gemma (1): the Llama layer with Gemma's RMSNorm (scaled by 1 + weight), GeGLU MLPs, embeddings
scaled by sqrt(hidden_size), a head_dim of its own (256 on the released models) and a tied LM head.

GemmaForCausalLM is also the frame of Gemma 2 and 3 (gemma2.py, gemma3.py): they change the decoder
layer, the attention options per layer and cap the final logits.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.executor.attention.layer import Attention
from radixserve.executor.layers.activation import GeluAndMul
from radixserve.executor.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from radixserve.executor.layers.norm import RMSNorm
from radixserve.executor.layers.rotary import RotaryEmbedding, rope_settings
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

# HF activation name -> torch gelu approximation. Gemma 1 configs say "gelu" for the tanh form
# (transformers reads it so); Gemma 2 and 3 name it exactly.
GEMMA1_GELU = {"gelu": "tanh", "gelu_pytorch_tanh": "tanh"}
GELU = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}


def gelu_approximation(name: str, names: dict[str, str]) -> str:
    if name not in names:
        raise ValueError(f"unsupported Gemma activation {name!r}; supported: {sorted(names)}")
    return names[name]


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight), all in float32 before rounding to x's dtype (HF Gemma numerics)."""

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and not torch.compiler.is_compiling():  # the Triton kernel, same numerics
            from radixserve.kernels import rmsnorm

            if residual is None:
                return rmsnorm.rmsnorm(x, self.weight, self.eps, unit_offset=True)
            return rmsnorm.fused_add_rmsnorm(x, residual, self.weight, self.eps, unit_offset=True)
        if residual is None:
            return self._normalize(x)
        residual = x.add_(residual)
        return self._normalize(residual), residual


def gemma_attention(
    config: ModelConfig,
    layer_id: int,
    scaling: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    attention_cls: type[LlamaAttention] = LlamaAttention,
) -> LlamaAttention:
    """Llama's attention block (q/k/v/o projections) with Gemma's scaling, window and soft-cap."""
    bias = bool(config.get("attention_bias", False))
    block = attention_cls(config, layer_id, bias, bias)
    block.attn = Attention(
        layer_id,
        block.num_heads,
        block.num_kv_heads,
        block.head_dim,
        scaling,
        sliding_window=sliding_window,
        logit_softcap=logit_softcap,
    )
    return block


class GemmaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig, layer_id: int):
        bias = bool(config.get("attention_bias", False))
        super().__init__(config, layer_id, bias, bias)
        hidden, eps = config.get("hidden_size"), config.get("rms_norm_eps", 1e-6)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        act = config.get("hidden_activation") or config.get("hidden_act", "gelu_pytorch_tanh")
        self.mlp.act = GeluAndMul(gelu_approximation(act, GEMMA1_GELU))
        self.is_sliding = False


class GemmaForCausalLM(LlamaForCausalLM):
    """Checkpoint names and loading are Llama's (load_weights); the modules differ."""

    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)
        self.config = config
        hidden = config.get("hidden_size")
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden)
        self.model.layers = nn.ModuleList(
            self.make_layer(config, i) for i in range(config.num_layers)
        )
        self.model.norm = GemmaRMSNorm(hidden, config.get("rms_norm_eps", 1e-6))
        # HF multiplies by sqrt(hidden) rounded to the weights' dtype.
        self.embed_scale = float(
            torch.tensor(hidden**0.5, dtype=torch.get_default_dtype(), device="cpu")
        )
        self.max_positions = max(config.context_length, config.get("max_position_embeddings", 0))
        # local_rotary_emb: the sliding layers' own table (Gemma 3), None where they share rotary_emb
        self.rotary_emb, self.local_rotary_emb = self.make_rotaries(config)
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(config.vocab_size, hidden)
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)
        self.final_logit_softcap = config.get("final_logit_softcapping") or None

    def make_layer(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return GemmaDecoderLayer(config, layer_id)

    def make_rotaries(self, config: ModelConfig) -> tuple[RotaryEmbedding, RotaryEmbedding | None]:
        return self.make_rotary(*rope_settings(config.hf)), None

    def make_rotary(self, theta: float, scaling: dict) -> RotaryEmbedding:
        return RotaryEmbedding(
            self.config.head_dim, self.max_positions, theta, scaling, torch.get_default_dtype()
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rope = self.rotary_emb.prepare(positions)
        local = rope if self.local_rotary_emb is None else self.local_rotary_emb.prepare(positions)
        x = self.model.embed_tokens(input_ids) * self.embed_scale
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, local if layer.is_sliding else rope)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.final_logit_softcap is not None:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits
