"""EAGLE draft heads for Llama-family targets (speculative decoding, issue 20; docs/speculative.md).

A draft head is one decoder layer run over the target's own hidden states. Draft position p reads the
target's hidden state at p and the embedding of the token at p + 1 (the token that state predicted);
its output stands in for the target's hidden state at p + 1, whose logits propose the token at p + 2.
Chained, the draft feeds its own output back as the next position's hidden state. Draft positions
are the target's (same rotary positions), and the draft's K/V of position p lives in its own pool at
the target's slot of p (executor/eagle_proposer.py).

EAGLE (EAGLE-1/2, e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B): `fc` [H, 2H] over [embed(token) | hidden],
with a bias unless the config says `"bias": false`; Llama decoder layers `layers.{i}`, of which layer 0
has no `input_layernorm` (the checkpoint has none; one there is not read); no final norm, the target's
LM head reads the output as it is. The hidden input is the target's last hidden state after its final
norm: what the target's forward returns (the LM head's input).

EAGLE3 (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): `fc` [H, n * H] over the target's hidden states
entering n layers (three: low, mid, high; target_capture_layers), skipped when the hidden input is
already H wide (the draft's own output, from the second chained position on); one `midlayer` whose
q/k/v read [input_layernorm(embed(token)) | hidden_norm(hidden)] (2H) with the hidden as residual;
`norm`, then its own `lm_head` over `draft_vocab_size` ids, draft id d being target id d + d2t[d]
(`d2t`; `t2d`, the [vocab] mask of target ids the draft can name, is checked against it). Without
`draft_vocab_size` the target's LM head serves and ids are the target's. The next position reads the
pre-norm output.

Both share the target's embedding (an `embed_tokens.weight` in the checkpoint is not read, as in
SGLang, which also replaces it with the target's); EAGLE shares its LM head too. The shared modules
are held outside the module tree, so the draft's parameters are only its own.
"""

from __future__ import annotations

import pathlib
from typing import Iterable, Iterator

import torch
from torch import nn

from radixserve.executor.layers.linear import QKVParallelLinear, ReplicatedLinear
from radixserve.executor.layers.embedding import ParallelLMHead
from radixserve.executor.layers.norm import RMSNorm
from radixserve.executor.model_config import ModelConfig, dtype_name
from radixserve.executor.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    config_rotary,
    load_checkpoint_tensor,
)
from radixserve.executor.weights import default_dtype, iterate_safetensors


def _checkpoint_name(name: str) -> str:
    """Published draft checkpoints name tensors at the top level; some conversions add `model.`."""
    return name.removeprefix("model.")


class _DraftHead(nn.Module):
    """What both heads share: the target's embedding (and maybe LM head), rotary tables, loading."""

    algorithm = ""
    # checkpoint names read from nowhere (the target's copies serve)
    ignored_names: tuple[str, ...] = ("embed_tokens.weight", "rotary_emb.inv_freq")

    def __init__(self, config: ModelConfig, target: nn.Module):
        super().__init__()
        self.config = config
        self.hidden_size = config.get("hidden_size")
        target_hidden = target.config.get("hidden_size")
        if {self.hidden_size, config.get("target_hidden_size", target_hidden)} != {target_hidden}:
            raise ValueError(
                f"{self.algorithm} draft of hidden size {self.hidden_size} for a target of "
                f"{target_hidden}: only drafts of the target's hidden size are supported"
            )
        if config.vocab_size != target.config.vocab_size:
            raise ValueError(
                f"{self.algorithm} draft vocabulary {config.vocab_size} != the target's "
                f"{target.config.vocab_size}"
            )
        # A tuple: shared modules stay out of this module's parameters (and its loading).
        self._shared = (target.model.embed_tokens, target.lm_head)
        self.rotary_emb = config_rotary(config)
        self.qkv_bias = self.o_bias = bool(config.get("attention_bias", False))

    @property
    def embed_tokens(self) -> nn.Module:
        return self._shared[0]

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the draft's KV pool (this shard's heads)."""
        layers = self.attention_layers()
        return len(layers), layers[0].num_kv_heads, layers[0].head_dim

    def attention_layers(self) -> list[LlamaAttention]:
        raise NotImplementedError

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target-vocabulary ids of draft-vocabulary ids."""
        return draft_ids

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = _checkpoint_name(name)
            if name in self.ignored_names:
                continue
            if self._load_special(name, tensor):
                loaded.add(name)
                continue
            loaded.add(
                load_checkpoint_tensor(params, LlamaForCausalLM.stacked_params, name, tensor)
            )
        missing = (set(params) | self.special_names()) - loaded
        if missing:
            raise ValueError(
                f"{self.algorithm} draft checkpoint lacks weights for: {sorted(missing)[:8]}"
            )
        self._check_loaded()

    def special_names(self) -> set[str]:
        """Checkpoint tensors that are not parameters but must be there."""
        return set()

    def _load_special(self, name: str, tensor: torch.Tensor) -> bool:
        return False

    def _check_loaded(self) -> None:
        pass


class EagleDraftModel(_DraftHead):
    """EAGLE-1/2 head; forward(input_ids, positions, hidden) -> (LM head input, next hidden)."""

    algorithm = "EAGLE"
    ignored_names = _DraftHead.ignored_names + ("lm_head.weight", "layers.0.input_layernorm.weight")

    def __init__(self, config: ModelConfig, target: nn.Module):
        super().__init__(config, target)
        hidden = self.hidden_size
        self.fc = ReplicatedLinear(2 * hidden, hidden, bias=bool(config.get("bias", True)))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, self.qkv_bias, self.o_bias)
            for i in range(config.num_layers)
        )
        self.layers[0].input_layernorm = nn.Identity()  # EAGLE's first layer has none

    def attention_layers(self) -> list[LlamaAttention]:
        return [layer.self_attn for layer in self.layers]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [T] (target ids: the token after each position), hidden [T, H] (the target's
        final hidden states, or this head's own output one position back). Both results are the
        pre-LM-head output [T, H]."""
        rope = self.rotary_emb.prepare(positions)
        x = self.fc(torch.cat((self.embed_tokens(input_ids), hidden), dim=-1))
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope)
        out = x + residual
        return out, out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._shared[1](hidden).float()


class Eagle3MidLayer(nn.Module):
    """EAGLE3's decoder layer: attention over [norm(embedding) | norm(hidden)], residual = hidden."""

    def __init__(self, config: ModelConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        hidden, eps = config.get("hidden_size"), config.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(config, 0, qkv_bias, o_bias)
        self.self_attn.qkv_proj = QKVParallelLinear(
            2 * hidden, config.head_dim, config.num_heads, config.num_kv_heads, bias=qkv_bias
        )
        self.mlp = LlamaMLP(
            hidden, config.get("intermediate_size"), bias=config.get("mlp_bias", False)
        )
        self.input_layernorm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, rope):
        x = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)
        x = self.self_attn(x, rope)
        x, residual = self.post_attention_layernorm(x, hidden)
        return self.mlp(x), residual


def target_capture_layers(config: ModelConfig, num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose input hidden states an EAGLE3 head reads (LlamaForCausalLM's
    capture_hidden_layers): the config's `eagle_aux_hidden_state_layer_ids` (in `eagle_config` or at
    the top level) name layers whose OUTPUT is read, i.e. the input of the layer after; without them
    the inputs of layers 2, L // 2 and L - 3, as SGLang."""
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or config.get(
        "eagle_aux_hidden_state_layer_ids"
    )
    n = num_target_layers
    layers = tuple(int(i) + 1 for i in ids) if ids else (2, n // 2, n - 3)
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(
            f"EAGLE3 reads the inputs of target layers {list(layers)}, not all in 0..{n - 1} "
            f"(eagle_aux_hidden_state_layer_ids name layer outputs: at most {n - 2})"
        )
    return layers


class Eagle3DraftModel(_DraftHead):
    """EAGLE3 head; forward(input_ids, positions, hidden) -> (LM head input, next hidden)."""

    algorithm = "EAGLE3"

    def __init__(self, config: ModelConfig, target: nn.Module):
        super().__init__(config, target)
        if config.num_layers != 1:
            raise ValueError(
                f"EAGLE3 drafts of {config.num_layers} layers are not supported (only 1)"
            )
        hidden = self.hidden_size
        self.capture_layers = target_capture_layers(config, target.config.num_layers)
        if len(self.capture_layers) < 2:  # forward tells target states from its own by width
            raise ValueError("EAGLE3 needs the hidden states of at least 2 target layers")
        self.fc = ReplicatedLinear(
            len(self.capture_layers) * hidden, hidden, bias=bool(config.get("bias", False))
        )
        self.midlayer = Eagle3MidLayer(config, self.qkv_bias, self.o_bias)
        self.norm = RMSNorm(hidden, config.get("rms_norm_eps", 1e-6))
        self.draft_vocab_size = config.get("draft_vocab_size")
        self.own_head = self.draft_vocab_size is not None
        if self.own_head:
            self.lm_head = ParallelLMHead(self.draft_vocab_size, hidden)
            self.register_buffer(
                "d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64), persistent=False
            )
        else:
            self.ignored_names = self.ignored_names + ("lm_head.weight", "d2t", "t2d")
        self._t2d: torch.Tensor | None = None

    def attention_layers(self) -> list[LlamaAttention]:
        return [self.midlayer.self_attn]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [T] (target ids: the token after each position); hidden [T, n * H] (the
        target's captured hidden states) or [T, H] (this head's own next hidden, one position back).
        Returns (normed: the LM head's input, pre-norm: the next position's hidden), [T, H] each."""
        rope = self.rotary_emb.prepare(positions)
        if hidden.shape[-1] != self.hidden_size:
            hidden = self.fc(hidden)
        x, residual = self.midlayer(self.embed_tokens(input_ids), hidden, rope)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (the target's, without draft_vocab_size)."""
        head = self.lm_head if self.own_head else self._shared[1]
        return head(hidden).float()

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids] if self.own_head else draft_ids

    def special_names(self) -> set[str]:
        return {"d2t"} if self.own_head else set()

    def _load_special(self, name: str, tensor: torch.Tensor) -> bool:
        if name == "d2t":
            if tensor.shape != self.d2t.shape:
                raise ValueError(
                    f"d2t has shape {tuple(tensor.shape)}, not [{self.draft_vocab_size}]"
                )
            self.d2t.copy_(tensor.to(torch.int64))
            return True
        if name == "t2d":
            self._t2d = tensor.to(torch.bool)
            return True
        return False

    def _check_loaded(self) -> None:
        if not self.own_head:
            return
        target_ids = (torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t).cpu()
        vocab = self.config.vocab_size
        if target_ids.min() < 0 or target_ids.max() >= vocab:
            raise ValueError(f"d2t maps draft ids outside the target vocabulary 0..{vocab - 1}")
        if self._t2d is not None:
            if self._t2d.shape != (vocab,):
                raise ValueError(f"t2d has shape {tuple(self._t2d.shape)}, not [{vocab}]")
            if not self._t2d[target_ids].all() or int(self._t2d.sum()) != self.draft_vocab_size:
                raise ValueError("t2d and d2t disagree on the draft vocabulary")
            self._t2d = None  # checked; not needed at run time


DRAFT_MODELS: dict[str, type[_DraftHead]] = {"EAGLE": EagleDraftModel, "EAGLE3": Eagle3DraftModel}


def draft_checkpoint(folder: pathlib.Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The draft's tensors: safetensors files, else pytorch_model*.bin (EAGLE-1 heads ship those)."""
    if list(folder.glob("*.safetensors")):
        yield from iterate_safetensors(folder)
        return
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no .safetensors or pytorch_model*.bin files in {folder}")
    for path in bins:
        yield from torch.load(path, map_location="cpu", weights_only=True).items()


def load_draft_model(
    algorithm: str, folder: str | pathlib.Path, target: nn.Module, device: torch.device
) -> _DraftHead:
    """The `algorithm` (EAGLE | EAGLE3) head in folder, in the target's dtype, on device, sharing
    the target's embedding (and LM head); its rotary tables cover the target's context."""
    if algorithm not in DRAFT_MODELS:
        raise ValueError(f"unknown draft head {algorithm!r}; choose from {sorted(DRAFT_MODELS)}")
    cfg = ModelConfig.load(
        pathlib.Path(folder), dtype_name(target.config.dtype), target.config.context_length
    )
    with torch.device(device), default_dtype(cfg.dtype):
        model = DRAFT_MODELS[algorithm](cfg, target)
    model.load_weights(draft_checkpoint(cfg.path))
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    return model.eval()
