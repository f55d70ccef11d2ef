"""The MoE models at --tp-size 2 (two gloo shards on the CPU, test_tensor_parallel's harness) against
tp=1: at --ep-size 1 each shard holds half of every expert's intermediate size, at --ep-size 2 half of the
experts, whole (and, either way, half of the heads, the dense and shared-expert MLPs, the vocabulary);
logits of prefill, decode and chunked prefill within 1e-5 and the same greedy tokens."""

import pytest
import torch

from tests.executor.hf_parity import MOE_CONFIGS, build_hf_model
from tests.tp_ranks import ATOL, GREEDY_TOKENS, build_runner, run_group, scenario


@pytest.mark.parametrize("ep", [1, 2])
@pytest.mark.parametrize("config", MOE_CONFIGS)
def test_two_shards_match_one(config, ep, tmp_path):
    build_hf_model(MOE_CONFIGS[config](), tmp_path / "model")
    single = build_runner(str(tmp_path / "model"))
    experts = {m.num_experts for m in single.model.modules() if hasattr(m, "num_local_experts")}
    expected = scenario(single)
    got = run_group(tmp_path / "model", tmp_path / "tp2.pt", ep=ep)
    assert got["moe_local_experts"] == [
        n // ep for n in experts
    ]  # rank 0's share of each MoE layer
    for part in ("prefill", "decode", "chunked"):
        torch.testing.assert_close(got[part], expected[part], atol=ATOL, rtol=ATOL, msg=part)
    assert len(got["greedy"]) == GREEDY_TOKENS and got["greedy"] == expected["greedy"]
