"""DBRX: a MoE decoder with LayerNorms without bias, q/k/v clipped to +-clip_qkv, and in every layer a
top-k MoE whose routing weights are divided by their p-norm (moe_normalize_expert_weights).

Checkpoint names differ from Llama's: transformer.wte / blocks.<i> / norm_f; per block
norm_attn_norm.{norm_1, attn.Wqkv, attn.out_proj, norm_2} and ffn.{router.layer, experts.mlp.*}.
Wqkv is one [q | k | v] tensor, and each expert tensor (w1: gate, v1: up, w2: down transposed) holds
every expert stacked as [num_experts * ffn_hidden_size, hidden]; load_weights splits them into
the per-expert, per-projection tensors MoeCausalLM loads (so tensor parallelism shards them as usual).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from radixserve.executor.layers.moe import SparseMoeBlock, select_experts
from radixserve.executor.layers.norm import LayerNorm
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import LlamaAttention
from radixserve.executor.models.moe_causal_lm import MoeCausalLM

_RENAMES = {
    "transformer.wte.": "model.embed_tokens.",
    "transformer.norm_f.": "model.norm.",
    "transformer.blocks.": "model.layers.",
    ".norm_attn_norm.norm_1.": ".input_layernorm.",
    ".norm_attn_norm.norm_2.": ".post_attention_layernorm.",
    ".norm_attn_norm.attn.out_proj.": ".self_attn.o_proj.",
    ".ffn.router.layer.": ".mlp.gate.",
}
_EXPERT_PROJECTIONS = ("w1", "v1", "w2")


class DbrxMoeBlock(SparseMoeBlock):
    """Softmax top-k routing, the chosen weights divided by their p-norm (p = norm_p; None: kept)."""

    def __init__(self, config: ModelConfig):
        ffn = config.get("ffn_config") or {}
        super().__init__(
            config.get("hidden_size"),
            ffn.get("moe_num_experts", 4),
            ffn.get("moe_top_k", 1),
            ffn.get("ffn_hidden_size"),
            renormalize=False,
        )
        self.norm_p = ffn.get("moe_normalize_expert_weights", 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, renormalize=False)
        if self.norm_p is not None:
            weights = weights / torch.linalg.vector_norm(
                weights, ord=self.norm_p, dim=-1, keepdim=True
            )
        return self.experts(x, weights, ids)


class DbrxForCausalLM(MoeCausalLM):
    expert_shards = {"w1": "gate", "v1": "up", "w2": "down"}

    def __init__(self, config: ModelConfig):
        act = ((config.get("ffn_config") or {}).get("ffn_act_fn") or {}).get("name", "silu")
        if act != "silu":
            raise ValueError(f"DBRX with ffn_act_fn {act!r}: only silu is supported")
        super().__init__(config)

    def make_norm(self, config: ModelConfig) -> nn.Module:
        return LayerNorm(config.get("hidden_size"), eps=1e-5, bias=False)

    def make_attention(self, config: ModelConfig, layer_id: int) -> nn.Module:
        attn = LlamaAttention(config, layer_id, qkv_bias=False, o_bias=False)
        clip = (config.get("attn_config") or {}).get("clip_qkv")
        if clip is not None:
            # q, k and v are clipped right out of the fused projection (before the rotation).
            attn.qkv_proj.register_forward_hook(lambda _m, _in, out: out.clamp(-clip, clip))
        return attn

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return DbrxMoeBlock(config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._split_fused_tensors(weights))

    def _split_fused_tensors(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors under our names, Wqkv as q/k/v_proj and the experts as experts.<j>.*."""
        attn = self.model.layers[0].self_attn
        d = attn.head_dim
        q_width = self.config.num_heads * d
        kv_width = self.config.num_kv_heads * d
        for name, tensor in weights:
            for old, new in _RENAMES.items():
                name = name.replace(old, new)
            if name.endswith(".norm_attn_norm.attn.Wqkv.weight"):
                prefix = name.removesuffix("norm_attn_norm.attn.Wqkv.weight") + "self_attn."
                q, k, v = tensor.split([q_width, kv_width, kv_width], dim=0)
                yield from ((f"{prefix}{p}_proj.weight", t) for p, t in zip("qkv", (q, k, v)))
                continue
            proj = name.rsplit(".", 1)[-1]
            if ".ffn.experts.mlp." in name and proj in _EXPERT_PROJECTIONS:
                mlp = self.model.layers[int(name.split(".")[2])].mlp
                experts = tensor.view(mlp.experts.num_experts, -1, tensor.shape[-1])
                prefix = name.split(".ffn.")[0] + ".mlp.experts"
                for j, expert in enumerate(experts):
                    # w2 is stored as [ffn_hidden, hidden]: the down projection's transpose
                    yield f"{prefix}.{j}.{proj}.weight", expert.t() if proj == "w2" else expert
                continue
            yield name, tensor
