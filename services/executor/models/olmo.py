"""OLMo (1B/7B, 0424/0724) and OLMo 2 (7B/13B/32B).

OLMo: Llama's pre-norm layers with a LayerNorm that has neither weight nor bias, and q, k and v
clamped to +-clip_qkv when the config sets it. OLMo 2: an RMSNorm over the whole q and the whole k
projection (all heads together) before the rotary embedding, and norms after attention and after the
MLP (on the branch, before the residual add) instead of before them. Its RMSNorm scales by the weight
in float32 and rounds after (Llama's rounds first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.executor.layers.embedding import VocabParallelEmbedding
from radixserve.executor.layers.linear import default_weight_loader
from radixserve.executor.layers.rotary import RopeStep
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    add_rotary_and_lm_head,
)
from radixserve.executor.parallel_state import all_reduce, tp_rank


class NonParametricLayerNorm(nn.Module):
    """LayerNorm without weight or bias, in float32; with a residual, (norm(x + residual), x + residual)
    like RMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.hidden_size,), eps=self.eps).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._normalize(x)
        residual = x.add_(residual)
        return self._normalize(residual), residual


class Olmo2RMSNorm(nn.Module):
    """RMSNorm scaling by the weight in float32. Over a width split across tensor-parallel ranks
    (OLMo 2's q and k norms) it sums the squares over the ranks: `total` features in all, each held by
    `replicas` ranks (KV heads replicated when there are fewer than ranks); the weight is this rank's
    slice."""

    def __init__(self, width: int, eps: float, total: int | None = None, replicas: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.eps, self.total, self.replicas = eps, total or width, replicas
        self.sharded = self.total != width

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        width = param.shape[0]
        start = tp_rank() // self.replicas * width if self.sharded else 0
        default_weight_loader(param, loaded.narrow(0, start, width))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        squares = h.pow(2).sum(-1, keepdim=True)
        if self.sharded:
            squares = all_reduce(squares) / self.replicas
        h = h * torch.rsqrt(squares / self.total + self.eps)
        return (self.weight * h).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._normalize(x)
        residual = x.add_(residual)
        return self._normalize(residual), residual


class OlmoAttention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_id: int):
        bias = bool(config.get("attention_bias", False))
        super().__init__(config, layer_id, qkv_bias=bias, o_bias=bias)
        self.clip_qkv = config.get("clip_qkv")

    def forward(self, x: torch.Tensor, rope: RopeStep) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp_(-self.clip_qkv, self.clip_qkv)
        return self.attend(qkv, rope)


class OlmoDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        hidden = config.get("hidden_size")
        self.self_attn = OlmoAttention(config, layer_id)
        self.mlp = LlamaMLP(hidden, config.get("intermediate_size"), bias=False)
        self.input_layernorm = NonParametricLayerNorm(hidden)
        self.post_attention_layernorm = NonParametricLayerNorm(hidden)

    forward = LlamaDecoderLayer.forward  # Llama's pre-norm residual order; only the norms differ


class Olmo2Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_id: int):
        bias = bool(config.get("attention_bias", False))
        super().__init__(config, layer_id, qkv_bias=bias, o_bias=bias)
        eps, d = config.get("rms_norm_eps", 1e-6), self.head_dim
        self.q_width = self.num_heads * d
        self.q_norm = Olmo2RMSNorm(self.q_width, eps, total=config.num_heads * d)
        self.k_norm = Olmo2RMSNorm(
            self.num_kv_heads * d,
            eps,
            total=config.num_kv_heads * d,
            replicas=self.qkv_proj.kv_replicas,
        )

    def forward(self, x: torch.Tensor, rope: RopeStep) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(
            [self.q_width, self.qk_width - self.q_width, self.qk_width - self.q_width], dim=-1
        )
        return self.attend(torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1), rope)


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        hidden, eps = config.get("hidden_size"), config.get("rms_norm_eps", 1e-6)
        self.self_attn = Olmo2Attention(config, layer_id)
        self.mlp = LlamaMLP(hidden, config.get("intermediate_size"), bias=False)
        self.post_attention_layernorm = Olmo2RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = Olmo2RMSNorm(hidden, eps)

    def forward(self, x, residual, rope: RopeStep):
        """(x, residual) as Llama's layers pass them: the hidden state is their sum."""
        h = x if residual is None else x + residual
        h = h + self.post_attention_layernorm(self.self_attn(h, rope))
        return self.post_feedforward_layernorm(self.mlp(h)), h


class _Decoder(nn.Module):
    def __init__(self, config: ModelConfig, layers, norm: nn.Module):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.get("hidden_size"))
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class OlmoForCausalLM(nn.Module):
    """Not a LlamaForCausalLM subclass on purpose: the fused CPU decode path (fast_decode.py) covers
    Llama's RMSNorm layers only. Its step, logits and loading are Llama's."""

    stacked_params = LlamaForCausalLM.stacked_params
    checkpoint_renames = LlamaForCausalLM.checkpoint_renames
    forward = LlamaForCausalLM.forward
    compute_logits = LlamaForCausalLM.compute_logits
    load_weights = LlamaForCausalLM.load_weights

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = self.make_decoder(config)
        add_rotary_and_lm_head(self, config)

    def make_decoder(self, config: ModelConfig) -> nn.Module:
        layers = (OlmoDecoderLayer(config, i) for i in range(config.num_layers))
        return _Decoder(config, layers, NonParametricLayerNorm(config.get("hidden_size")))


class Olmo2ForCausalLM(OlmoForCausalLM):
    def make_decoder(self, config: ModelConfig) -> nn.Module:
        layers = (Olmo2DecoderLayer(config, i) for i in range(config.num_layers))
        norm = Olmo2RMSNorm(config.get("hidden_size"), config.get("rms_norm_eps", 1e-6))
        return _Decoder(config, layers, norm)
