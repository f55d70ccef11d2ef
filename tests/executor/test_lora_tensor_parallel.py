"""LoRA under tensor parallelism on the CPU (gloo): two shards (column-parallel qkv / gate_up with B split
on their output rows, row-parallel o / down with A split on their input columns and the shrink
all-reduced) give the logits and greedy tokens of one, for a batch mixing the base model and three
adapters (two from --lora-paths, one loaded at run time on every shard), with KV heads split over the
shards and with one KV head replicated on both.

Tolerance: atol 3e-5 (fp32; the shards' partial sums add up in another order, and the row-parallel LoRA
shrink's partial sums are all-reduced before the expand multiplies them; seen: up to 1.7e-5 on the
decode logits of kv_replicated_tied_bias since decode tokens are laid out by adapter), three times
tests/tp_ranks.py's ATOL for the base model; the greedy tokens must be equal."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.executor.hf_parity import build_hf_model  # noqa: E402
from tests.executor.lora_adapters import ADAPTERS, make_adapter  # noqa: E402
from tests.executor.lora_tp_ranks import build_lora_runner, lora_scenario, run_lora_group  # noqa: E402
from tests.executor.test_tensor_parallel import CONFIGS  # noqa: E402
from tests.tp_ranks import ATOL, on_cpu  # noqa: E402

LORA_ATOL = 3 * ATOL


@pytest.mark.parametrize("config", CONFIGS)
def test_two_shards_match_one_with_adapters(config, tmp_path):
    hf = build_hf_model(CONFIGS[config](), tmp_path / "model")
    for i, name in enumerate(ADAPTERS):
        make_adapter(hf, tmp_path / "adapters" / name, name, seed=i)
    expected = on_cpu(
        lora_scenario(
            build_lora_runner(str(tmp_path / "model"), tmp_path / "adapters"), tmp_path / "adapters"
        )
    )
    got = run_lora_group(tmp_path / "model", tmp_path / "adapters", tmp_path / "tp2.pt")
    for part in ("prefill", "decode"):
        torch.testing.assert_close(got[part], expected[part], atol=LORA_ATOL, rtol=ATOL)
    assert got["tokens"] == expected["tokens"]
    assert got["loaded"] == expected["loaded"] == ["all8", "mix16"]
