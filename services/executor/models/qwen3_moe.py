"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): attention with an RMSNorm over each q and k head before
the rotary embedding (as Qwen3), optional attention biases, sparse MoE blocks without a shared expert
(routing weights renormalized with norm_topk_prob), dense MLPs where the config says so."""

import torch
from torch import nn

from radixserve.executor.layers.norm import RMSNorm
from radixserve.executor.layers.rotary import RopeStep
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaAttention
from radixserve.executor.models.moe_causal_lm import MoeCausalLM
from radixserve.executor.models.qwen2_moe import qwen_moe_mlp


class QKNormAttention(LlamaAttention):
    def __init__(self, config: ModelConfig, layer_id: int, qkv_bias: bool, o_bias: bool):
        super().__init__(config, layer_id, qkv_bias, o_bias)
        eps = config.get("rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def forward(self, x: torch.Tensor, rope: RopeStep) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        t, d = qkv.shape[0], self.head_dim
        q_width = self.num_heads * d
        q = self.q_norm(qkv[:, :q_width].view(t, self.num_heads, d))
        k = self.k_norm(qkv[:, q_width : self.qk_width].view(t, self.num_kv_heads, d))
        v = qkv[:, self.qk_width :].view(t, self.num_kv_heads, d)
        o = self.attn(
            torch.cat((q, k), dim=1), v, rope
        )  # normed, then rotated by the attention backend
        return self.o_proj(o)


class Qwen3MoeForCausalLM(MoeCausalLM):
    expert_shards = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def make_attention(self, config: ModelConfig, layer_id: int) -> QKNormAttention:
        bias = bool(config.get("attention_bias", False))
        return QKNormAttention(config, layer_id, qkv_bias=bias, o_bias=bias)

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return qwen_moe_mlp(config, layer_id)
