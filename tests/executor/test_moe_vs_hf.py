"""Our Mixtral, Qwen2-MoE and Qwen3-MoE against transformers, on tiny random fp32 models saved as HF
folders and loaded through the executor's normal path (ModelRunner: safetensors, stacked experts).

The three parity tests are test_model_vs_hf's (tests/executor/hf_parity.py), run here against this
module's `models` fixture: batched prefill + decode + prefix reuse and chunked prefill (last-position
logits within atol 1e-4 of HF's forward) and 32 greedy tokens identical to HF's generate. Attention
runs torch_native on CPU and triton on CUDA (where the MoE layers then run kernels/fused_moe.py); the
triton attention backend under the interpreter is left to test_model_vs_hf (it is not MoE code, and
would cost ~50 s here).
"""

import pytest
import torch

from radixserve.executor.layers.moe import SparseMoeBlock
from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from radixserve.common.step import NewRequest, StepInput
from radixserve.executor.weights import iterate_safetensors
from tests.executor.hf_parity import (
    MOE_CONFIGS,
    VOCAB,
    build_hf_model,
    check_batched_prefill_decode_and_prefix_reuse,
    check_chunked_prefill,
    check_greedy_matches_hf_generate,
    prompts,
)

CUDA = torch.cuda.is_available()
BACKEND = "triton" if CUDA else "torch_native"


@pytest.fixture(scope="module", params=list(MOE_CONFIGS))
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_hf_model(MOE_CONFIGS[request.param](), folder)
    runner = ModelRunner(
        folder,
        runner_config(
            dtype="float32",
            device="cuda" if CUDA else "cpu",
            max_total_tokens=1024,
            attention_backend=BACKEND,
        ),
    )
    return hf, runner


def test_batched_prefill_decode_and_prefix_reuse(models):
    check_batched_prefill_decode_and_prefix_reuse(models)


def test_chunked_prefill(models):
    check_chunked_prefill(models)


def test_greedy_matches_hf_generate(models):
    check_greedy_matches_hf_generate(models)


def test_sparse_layers_where_hf_has_them(models):
    hf, runner = models
    ours = [isinstance(layer.mlp, SparseMoeBlock) for layer in runner.model.model.layers]
    theirs = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert ours == theirs and any(ours)


def test_dummy_load_format_runs(models):
    _, runner = models
    dummy = ModelRunner(
        runner.config.path,
        runner_config(
            dtype="float32",
            device=str(runner.device),
            load_format="dummy",
            max_total_tokens=64,
            attention_backend=BACKEND,
            random_seed=1,
        ),
    )
    out = dummy.step(
        StepInput(1, new_requests=[NewRequest("a", prompts(5, 6)[0], list(range(1, 7)))])
    )
    assert out.logits.shape == (1, VOCAB) and torch.isfinite(out.logits).all()
    assert out.logits.std() > 0


def test_missing_expert_tensor_is_an_error(models):
    _, runner = models
    weights = list(iterate_safetensors(runner.config.path))
    dropped = next(
        n for n, _ in weights if ".experts.2." in n and n.endswith(("up_proj.weight", "w3.weight"))
    )
    layer = dropped.split(".")[2]
    with pytest.raises(ValueError, match=rf"layers\.{layer}\.mlp\.experts\.w13_weight"):
        runner.model.load_weights([(n, t) for n, t in weights if n != dropped])
