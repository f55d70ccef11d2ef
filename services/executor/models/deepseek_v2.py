"""DeepSeek V2 / V2-Lite / V3: multi-head latent attention (attention/mla.py, compressed KV cache) and
DeepSeek MoE (grouped top-k routing, shared experts) after first_k_dense_replace dense layers.

Attention: q from q_proj, or (q_lora_rank) q_b_proj(norm(q_a_proj(x))); kv_a_proj_with_mqa gives the
latent (normed by kv_a_layernorm) and one shared rope key. The checkpoint lays the rope dims out in
interleaved pairs (V2 always, V3 unless rope_interleave is false); they are de-interleaved here before
the shared NeoX-style rotary, which leaves q . k unchanged. YaRN's mscale_all_dim also scales the
softmax (mscale squared).

V3's multi-token-prediction layers (checkpoint index num_hidden_layers and up) load into
model.mtp_layers, which the forward does not use; a checkpoint without them is fine.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from radixserve.executor.attention.mla import LatentUpProjection, MLAAttention
from radixserve.executor.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from radixserve.executor.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from radixserve.executor.layers.moe import FusedMoE, select_experts_grouped
from radixserve.executor.layers.norm import RMSNorm
from radixserve.executor.layers.rotary import RopeStep, rope_settings, yarn_mscale
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaMLP
from radixserve.executor.models.moe_causal_lm import MoeCausalLM, MoeDecoderLayer
from radixserve.executor.parallel_state import tp_size

LATENT_NORM_EPS = (
    1e-6  # q_a_layernorm / kv_a_layernorm: the published code's default, not rms_norm_eps
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def mla_softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(qk_nope + qk_rope), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = (config.get("qk_nope_head_dim") + config.get("qk_rope_head_dim")) ** -0.5
    _, rope = rope_settings(config.hf)
    if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
        scale *= yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[.., (a0 b0 a1 b1 ..)] -> [.., (a0 a1 .. b0 b1 ..)]: pairs become NeoX halves."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class DeepseekV2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        hidden, heads = config.get("hidden_size"), config.num_heads
        if heads % tp_size():
            raise ValueError(f"{heads} attention heads do not split over {tp_size()} ranks")
        bias = bool(config.get("attention_bias", False))
        self.qk_nope = config.get("qk_nope_head_dim")
        self.qk_rope = config.get("qk_rope_head_dim")
        self.v_head_dim = config.get("v_head_dim")
        self.kv_lora_rank = config.get("kv_lora_rank")
        self.q_lora_rank = config.get("q_lora_rank")
        qk_head = self.qk_nope + self.qk_rope
        if self.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_head)
        else:
            self.q_proj = ColumnParallelLinear(hidden, heads * qk_head)
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            hidden, self.kv_lora_rank + self.qk_rope, bias=bias
        )
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = LatentUpProjection(self.kv_lora_rank, heads, self.qk_nope, self.v_head_dim)
        self.o_proj = RowParallelLinear(heads * self.v_head_dim, hidden, bias=bias)
        self.num_heads = heads // tp_size()
        self.num_kv_heads = 1  # the latent row: one "kv head" of the pool
        self.interleaved_rope = bool(config.get("rope_interleave", True))
        self.attn = MLAAttention(
            layer_id,
            self.num_heads,
            self.qk_nope,
            self.qk_rope,
            self.v_head_dim,
            self.kv_lora_rank,
            mla_softmax_scale(config),
        )

    def forward(self, x: torch.Tensor, rope: RopeStep) -> torch.Tensor:
        t = x.shape[0]
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(t, self.num_heads, -1).split([self.qk_nope, self.qk_rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        pe = torch.cat((q_pe, k_pe.unsqueeze(1)), dim=1)  # [T, heads + 1, rope], q heads first
        if self.interleaved_rope:
            pe = deinterleave(pe)
        pe = rope.rotate(pe.contiguous(), self.num_heads)
        o = self.attn(
            q_nope, pe[:, : self.num_heads], latent, pe[:, self.num_heads], self.kv_b_proj
        )
        return self.o_proj(o)


class DeepseekRouter(ReplicatedLinear):
    """The MoE gate [num_experts, hidden] (logits in float32, as the published code computes them),
    with noaux_tc's e_score_correction_bias."""

    def __init__(self, hidden_size: int, num_experts: int, correction_bias: bool):
        super().__init__(hidden_size, num_experts)
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias
            else None
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return nn.functional.linear(x.float(), self.weight.float())
        return self(x).float()


class DeepseekMoE(nn.Module):
    def __init__(self, config: ModelConfig, topk_method: str, scoring: str):
        super().__init__()
        hidden, inter = config.get("hidden_size"), config.get("moe_intermediate_size")
        num_experts = config.get("n_routed_experts")
        self.top_k = config.get("num_experts_per_tok")
        self.method, self.scoring = topk_method, scoring
        self.num_groups = config.get("n_group") or 1
        self.topk_groups = config.get("topk_group") or 1
        self.renormalize = bool(config.get("norm_topk_prob", False))
        self.scaling_factor = float(config.get("routed_scaling_factor", 1.0))
        self.gate = DeepseekRouter(hidden, num_experts, topk_method == "noaux_tc")
        self.experts = FusedMoE(num_experts, hidden, inter)
        shared = config.get("n_shared_experts") or 0
        self.shared_experts = LlamaMLP(hidden, inter * shared, bias=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts_grouped(
            self.gate.logits(x),
            self.top_k,
            self.method,
            self.num_groups,
            self.topk_groups,
            self.scoring,
            self.gate.e_score_correction_bias,
            self.renormalize,
            self.scaling_factor,
        )
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekMtpLayer(MoeDecoderLayer):
    """A multi-token-prediction layer: a decoder layer plus its own embedding, norms, eh_proj and
    head. Loaded and kept; not run."""

    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module):
        super().__init__(config, self_attn, mlp)
        hidden, eps = config.get("hidden_size"), config.get("rms_norm_eps", 1e-6)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden)
        self.enorm, self.hnorm = RMSNorm(hidden, eps), RMSNorm(hidden, eps)
        self.eh_proj = ReplicatedLinear(2 * hidden, hidden)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(hidden, eps)
        self.shared_head.head = ParallelLMHead(config.vocab_size, hidden)


class DeepseekV2ForCausalLM(MoeCausalLM):
    expert_shards = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    stacked_params = {".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}
    default_topk_method, default_scoring = "greedy", "softmax"

    def __init__(self, config: ModelConfig):
        super().__init__(config, rope_table_dim=config.get("qk_rope_head_dim"))
        self.kv_head_dims = (config.get("kv_lora_rank") + config.get("qk_rope_head_dim"), 0)
        num_mtp = config.get("num_nextn_predict_layers") or config.get("num_mtp_layers") or 0
        first = config.num_layers
        self.model.mtp_layers = nn.ModuleList(
            DeepseekMtpLayer(config, self.make_attention(config, i), self.make_mlp(config, i))
            for i in range(first, first + num_mtp)
        )
        self.mtp_loaded = False

    def make_attention(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return DeepseekV2Attention(config, layer_id)

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        sparse = (
            config.get("n_routed_experts")
            and layer_id >= config.get("first_k_dense_replace", 0)
            and layer_id % (config.get("moe_layer_freq") or 1) == 0
        )
        if not sparse:
            return LlamaMLP(config.get("hidden_size"), config.get("intermediate_size"), bias=False)
        return DeepseekMoE(
            config,
            config.get("topk_method") or self.default_topk_method,
            config.get("scoring_func") or self.default_scoring,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._mtp_renamed(weights))
        if not self.mtp_loaded:
            self.model.mtp_layers = nn.ModuleList()

    def _mtp_renamed(self, weights):
        """model.layers.<num_hidden_layers + i>.* -> model.mtp_layers.<i>.*"""
        first = self.config.num_layers
        for name, tensor in weights:
            layer = _LAYER.match(name)
            if layer and int(layer[1]) >= first:
                self.mtp_loaded = True
                name = f"model.mtp_layers.{int(layer[1]) - first}.{name[layer.end() :]}"
            yield name, tensor

    def may_be_absent(self, name: str) -> bool:
        return not self.mtp_loaded and name.startswith("model.mtp_layers.")


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    default_topk_method, default_scoring = "noaux_tc", "sigmoid"
