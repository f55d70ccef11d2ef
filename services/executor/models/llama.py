"""Llama family (Llama 2/3, Mistral-style, SmolLM2): forward over a flattened token batch."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from radixserve.executor.attention.layer import Attention
from radixserve.executor.layers.activation import SiluAndMul
from radixserve.executor.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from radixserve.executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from radixserve.executor.layers.norm import RMSNorm
from radixserve.executor.layers.rotary import RopeStep, RotaryEmbedding, rope_settings
from radixserve.executor.model_config import ModelConfig


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        hidden = config.get("hidden_size")
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden, d, config.num_heads, config.num_kv_heads, bias=qkv_bias
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            config.num_heads * d, hidden, bias=o_bias
        )  # all heads: it shards them
        self.attn = Attention(layer_id, self.num_heads, self.num_kv_heads, d, scaling=d**-0.5)
        self.qk_width = (self.num_heads + self.num_kv_heads) * d
        self.head_dim = d

    def forward(self, x: torch.Tensor, rope: RopeStep) -> torch.Tensor:
        return self.attend(self.qkv_proj(x), rope)

    def attend(self, qkv: torch.Tensor, rope: RopeStep) -> torch.Tensor:
        """Attention and the output projection over the fused [q | k | v] projection [T, width]."""
        t = qkv.shape[0]
        # q and k go to attention together and unrotated: its backend rotates them in one op, or in
        # the kernel that stores K/V.
        qk = qkv[:, : self.qk_width].view(t, -1, self.head_dim)
        v = qkv[:, self.qk_width :].view(t, self.num_kv_heads, self.head_dim)
        o = self.attn(qk, v, rope)
        return self.o_proj(o)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        hidden, eps = config.get("hidden_size"), config.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(config, layer_id, qkv_bias, o_bias)
        self.mlp = LlamaMLP(
            hidden, config.get("intermediate_size"), bias=config.get("mlp_bias", False)
        )
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, x, residual, rope: RopeStep):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.get("hidden_size"))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, qkv_bias, o_bias) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.get("hidden_size"), config.get("rms_norm_eps", 1e-6))


class LlamaForCausalLM(nn.Module):
    # HF weight name fragment -> (our fused parameter fragment, shard id)
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }
    # checkpoint name fragment -> ours (Llama's), applied in order before anything else
    checkpoint_renames: dict[str, str] = {}

    # Opt-in (the runner sets it; EAGLE3 draft heads read the result): forward keeps the hidden state
    # entering each of these layers (the pre-norm residual stream) in captured_hidden, [T, n * hidden]
    # in this order. Empty: nothing kept, forward unchanged.
    capture_hidden_layers: tuple[int, ...] = ()
    captured_hidden: torch.Tensor | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, qkv_bias=self.qkv_bias(config), o_bias=self.o_bias(config))
        add_rotary_and_lm_head(self, config, self.rotary_dim(config))

    @staticmethod
    def qkv_bias(config: ModelConfig) -> bool:
        return bool(config.get("attention_bias", False))

    @staticmethod
    def o_bias(config: ModelConfig) -> bool:
        return bool(config.get("attention_bias", False))

    @staticmethod
    def rotary_dim(config: ModelConfig) -> int | None:
        """How many dims of each head rotate (None: all)."""
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a flattened token batch (after the final norm). input_embeds:
        the input rows [T, hidden] instead of the embeddings of input_ids (a vision-language model's
        image rows written in)."""
        rope = self.rotary_emb.prepare(positions)
        x = self.model.embed_tokens(input_ids) if input_embeds is None else input_embeds
        residual = None
        capture = getattr(self, "capture_hidden_layers", ())  # also run by non-subclasses
        kept: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.layers):
            if i in capture:
                kept[i] = keep_layer_input(x, residual)
            x, residual = layer(x, residual, rope)
        if capture:
            self.captured_hidden = torch.cat([kept[i] for i in capture], dim=-1)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            for old, new in self.checkpoint_renames.items():
                name = name.replace(old, new)
            if "rotary_emb.inv_freq" in name or (
                self.tie_word_embeddings and name == "lm_head.weight"
            ):
                continue
            loaded.add(load_checkpoint_tensor(params, self.stacked_params, name, tensor))
        missing = {n for n in params if n not in loaded}
        if self.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {sorted(missing)[:8]}")


def keep_layer_input(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """A copy of the hidden state entering a layer (x + residual: norms may add in place)."""
    return x.clone() if residual is None else x + residual


def add_rotary_and_lm_head(
    causal_lm: nn.Module,
    config: ModelConfig,
    rotary_dim: int | None = None,
    table_dim: int | None = None,
) -> None:
    """What every Llama-style causal LM has around its decoder (`causal_lm.model`): the rotary
    tables (`table_dim` columns, else the head dim, of which the first `rotary_dim` rotate: layers/
    rotary.py's RotaryLayout) and the LM head, tied to the input embedding when the config says so."""
    causal_lm.rotary_emb = config_rotary(config, rotary_dim, table_dim)
    causal_lm.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
    causal_lm.lm_head = ParallelLMHead(config.vocab_size, config.get("hidden_size"))
    if causal_lm.tie_word_embeddings:
        causal_lm.lm_head.tie_to(causal_lm.model.embed_tokens)


def config_rotary(
    config: ModelConfig, rotary_dim: int | None = None, table_dim: int | None = None
) -> RotaryEmbedding:
    """The config's rotary tables, long enough for the context and max_position_embeddings."""
    theta, scaling = rope_settings(config.hf)
    max_pos = max(config.context_length, config.get("max_position_embeddings", 0))
    return RotaryEmbedding(
        table_dim or config.head_dim, max_pos, theta, scaling, torch.get_default_dtype(), rotary_dim
    )


def load_checkpoint_tensor(
    params: dict, stacked_params: dict, name: str, tensor: torch.Tensor
) -> str:
    """Load one checkpoint tensor into its parameter (q/k/v and gate/up into their fused parameter,
    through its shard); returns the parameter's name."""
    shard = None
    for fragment, (fused, shard_id) in stacked_params.items():
        if fragment in name:
            name, shard = name.replace(fragment, fused), shard_id
            break
    if name not in params:
        raise KeyError(f"checkpoint tensor {name} has no matching parameter")
    param = params[name]
    loader = getattr(param, "weight_loader", None)
    if shard is not None:
        loader(param, tensor, shard)
    elif loader is not None:
        loader(param, tensor)
    else:
        default_weight_loader(param, tensor)
    return name
