"""Decoder-only MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE): Llama's step with a sparse MoE block
(services/executor/layers/moe.py) in place of the MLP of some or all layers.

Subclasses say how to build a layer's attention and MLP and how the checkpoint names the experts'
projections; checkpoint tensors `...experts.<j>.<proj>.weight` of every expert are stacked into the
layer's FusedMoE parameters [num_experts, ...]. Not a LlamaForCausalLM subclass on purpose: the fused
CPU decode path (fast_decode.py) covers dense Llama layers only.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable

import torch
from torch import nn

from radixserve.executor.layers.embedding import VocabParallelEmbedding
from radixserve.executor.layers.moe import FusedMoE
from radixserve.executor.layers.norm import RMSNorm
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    add_rotary_and_lm_head,
    load_checkpoint_tensor,
)

_EXPERT_TENSOR = re.compile(r"^(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


def config_num_experts(config: ModelConfig) -> int:
    """Routed experts per MoE layer (`num_local_experts` in Mixtral's config, `num_experts` in Qwen's)."""
    return int(config.get("num_experts") or config.get("num_local_experts") or 0)


def qwen_layer_is_sparse(config: ModelConfig, layer_id: int) -> bool:
    """Qwen MoE configs: a layer is sparse unless listed in mlp_only_layers or off the decoder_sparse_step."""
    return (
        layer_id not in (config.get("mlp_only_layers") or [])
        and config_num_experts(config) > 0
        and (layer_id + 1) % config.get("decoder_sparse_step", 1) == 0
    )


def rms_norm(config: ModelConfig) -> RMSNorm:
    return RMSNorm(config.get("hidden_size"), config.get("rms_norm_eps", 1e-6))


class MoeDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        self_attn: nn.Module,
        mlp: nn.Module,
        make_norm: Callable[[ModelConfig], nn.Module] = rms_norm,
    ):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = make_norm(config)
        self.post_attention_layernorm = make_norm(config)

    forward = LlamaDecoderLayer.forward  # same residual / norm order; only the modules differ


class MoeModel(nn.Module):
    def __init__(self, config: ModelConfig, layers: Iterable[nn.Module], norm: nn.Module):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.get("hidden_size"))
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class MoeCausalLM(nn.Module):
    # checkpoint name of an expert's projection -> FusedMoE shard ("gate", "up" or "down")
    expert_shards: dict[str, str] = {}
    # checkpoint name fragment -> ours, applied before anything else (e.g. Mixtral's block_sparse_moe -> mlp)
    checkpoint_renames: dict[str, str] = {}
    stacked_params = LlamaForCausalLM.stacked_params  # q/k/v and dense gate/up fused as in Llama

    def __init__(self, config: ModelConfig, rope_table_dim: int | None = None):
        super().__init__()
        self.config = config
        self.model = MoeModel(
            config,
            (self.make_layer(config, i) for i in range(config.num_layers)),
            self.make_norm(config),
        )
        add_rotary_and_lm_head(self, config, table_dim=rope_table_dim)

    def make_norm(self, config: ModelConfig) -> nn.Module:
        """The norm of each layer's two norms and of the final one."""
        return rms_norm(config)

    def make_layer(self, config: ModelConfig, layer_id: int) -> nn.Module:
        return MoeDecoderLayer(
            config,
            self.make_attention(config, layer_id),
            self.make_mlp(config, layer_id),
            self.make_norm,
        )

    def make_attention(self, config: ModelConfig, layer_id: int) -> nn.Module:
        bias = bool(config.get("attention_bias", False))
        return LlamaAttention(config, layer_id, qkv_bias=bias, o_bias=bias)

    def make_mlp(self, config: ModelConfig, layer_id: int) -> nn.Module:
        raise NotImplementedError

    # The step is Llama's: embed, layers, final norm; logits from the LM head.
    forward = LlamaForCausalLM.forward
    compute_logits = LlamaForCausalLM.compute_logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        expert_tensors: Counter[str] = Counter()  # per stacked parameter: checkpoint tensors seen
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (
                self.tie_word_embeddings and name == "lm_head.weight"
            ):
                continue
            for old, new in self.checkpoint_renames.items():
                name = name.replace(old, new)
            expert = _EXPERT_TENSOR.match(name)
            if expert and expert["proj"] in self.expert_shards:
                shard = self.expert_shards[expert["proj"]]
                name = f"{expert['experts']}.{'w2' if shard == 'down' else 'w13'}_weight"
                if name not in params:
                    raise KeyError(f"checkpoint tensor {expert.string} has no matching parameter")
                params[name].weight_loader(params[name], tensor, int(expert["expert"]), shard)
                expert_tensors[name] += 1
                loaded.add(name)
                continue
            loaded.add(load_checkpoint_tensor(params, self.stacked_params, name, tensor))
        missing = {n for n in params if n not in loaded}
        if self.tie_word_embeddings:
            missing.discard("lm_head.weight")
        for name, module in self.named_modules():
            if isinstance(module, FusedMoE):
                for stacked, per_expert in ((f"{name}.w13_weight", 2), (f"{name}.w2_weight", 1)):
                    if expert_tensors[stacked] != per_expert * module.num_experts:
                        missing.add(
                            f"{stacked} ({expert_tensors[stacked]} of "
                            f"{per_expert * module.num_experts} expert tensors)"
                        )
        missing = {n for n in missing if not self.may_be_absent(n)}
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {sorted(missing)[:8]}")

    def may_be_absent(self, name: str) -> bool:
        """Whether a parameter the checkpoint did not fill is fine (a module kept only when present)."""
        return False
