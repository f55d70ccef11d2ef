"""scripts/make_dummy_eagle3.py: the head it writes for a target's config loads through the server's own
loader (every published name present, d2t/t2d agreeing) and drafts target ids from the reduced vocabulary."""

from __future__ import annotations


import torch
import transformers

from tests.bench.scripts_loader import load_script
from radixserve.executor.model_config import ModelConfig
from radixserve.executor.models.eagle import load_draft_model
from radixserve.executor.runner import load_model


def test_head_loads_over_its_target_and_drafts_target_ids(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "target")
    target = load_model(
        ModelConfig.load(tmp_path / "target", "float32"), torch.device("cpu"), "auto", None
    )
    folder = load_script("make_dummy_eagle3").main(
        [
            "--model-path",
            str(tmp_path / "target"),
            "--out",
            str(tmp_path / "head"),
            "--draft-vocab-size",
            "40",
        ]
    )
    head = load_draft_model("EAGLE3", folder, target, torch.device("cpu"))
    assert head.draft_vocab_size == 40 and head.lm_head.weight.shape[-1] == 64
    target_ids = head.to_target_ids(torch.arange(40))
    assert target_ids.unique().numel() == 40 and int(target_ids.max()) < 300
