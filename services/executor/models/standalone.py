"""A STANDALONE draft model (speculative decoding, issue 20; docs/speculative.md): a whole small causal
LM of the target's vocabulary, drafting by itself (no target hidden states).

It has the draft heads' interface (models/eagle.py), so EagleProposer runs it: forward(input_ids,
positions, hidden) -> (LM head input, next hidden), compute_logits, to_target_ids, kv_shape,
rotary_emb. The alignment differs: an EAGLE head at position p reads token p + 1 (with the target's
hidden state at p); this model reads token p at position p, so `reads_own_token` tells the proposer to
run one position further (the token just sampled, at a scratch slot) and `hidden` is ignored.
Its K/V of position p lives in its own pool at the target's slot of p, as a head's does.
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn

from radixserve.executor.model_config import ModelConfig, dtype_name
from radixserve.executor.models.llama import LlamaForCausalLM
from radixserve.executor.models.registry import get_model_class


class StandaloneDraftModel(nn.Module):
    """A loaded Llama-family causal LM as a draft model."""

    algorithm = "STANDALONE"
    reads_own_token = True  # position p reads token p (EagleProposer runs one position further)

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model
        self.rotary_emb = model.rotary_emb

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the draft's KV pool (this shard's heads)."""
        layers = self.model.model.layers
        attn = layers[0].self_attn
        return len(layers), attn.num_kv_heads, attn.head_dim

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [T]: the token at each position; hidden: not read. Both results are the
        model's final hidden states [T, H] (the LM head's input)."""
        out = self.model(input_ids, positions)
        return out, out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids  # the target's vocabulary


def load_standalone_draft(
    folder: str | pathlib.Path,
    target: nn.Module,
    device: torch.device,
    load_format: str = "auto",
    seed: int | None = None,
) -> StandaloneDraftModel:
    """The causal LM in folder as a draft for target: in the target's dtype, its rotary tables over
    the target's context; random weights with load_format "dummy" (the target's; seed too).
    ValueError unless it is a Llama-family model of the target's vocabulary size."""
    from radixserve.executor.runner import load_model  # (the runner imports this module's user)

    cfg = ModelConfig.load(
        pathlib.Path(folder), dtype_name(target.config.dtype), target.config.context_length
    )
    if cfg.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"STANDALONE draft model vocabulary {cfg.vocab_size} != the target's "
            f"{target.config.vocab_size}: the draft must share the target's tokenizer"
        )
    if not issubclass(get_model_class(cfg.architecture), LlamaForCausalLM):
        raise ValueError(
            f"STANDALONE draft models are Llama-family causal LMs (LlamaForCausalLM and the "
            f"architectures built on it); {cfg.architecture} is not one"
        )
    model = load_model(cfg, device, "dummy" if load_format == "dummy" else "auto", seed)
    if hasattr(model, "kv_head_dims"):  # (none of the Llama family today)
        raise ValueError(f"{cfg.architecture}: a KV cache of its own layout cannot draft")
    return StandaloneDraftModel(model).eval()
