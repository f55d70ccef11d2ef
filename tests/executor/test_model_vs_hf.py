"""Our Llama/Qwen2 against transformers' forward and greedy generate, on tiny random models in fp32,
with each attention backend: torch_native, and triton (the GPU backend: slot table, paged extend
and split-KV decode kernels; on a machine without CUDA under TRITON_INTERPRET=1).

Tolerance: logits agree to atol 1e-4 (fp32; the differences come from op order).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.executor.runner import ModelRunner  # noqa: E402
from tests.executor.hf_parity import (
    CONFIGS,
    build_hf_model,  # noqa: E402
    check_batched_prefill_decode_and_prefix_reuse,
    check_chunked_prefill,
    check_greedy_matches_hf_generate,
)
from tests.configs import runner_config


@pytest.fixture(
    scope="module",
    params=[(c, b) for c in CONFIGS for b in ("torch_native", "triton")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def models(request, tmp_path_factory):
    config, backend = request.param
    folder = tmp_path_factory.mktemp(config)
    hf = build_hf_model(config, folder)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    runner = ModelRunner(
        folder,
        runner_config(
            dtype="float32", device=device, max_total_tokens=1024, attention_backend=backend
        ),
    )
    return hf, runner


def test_batched_prefill_decode_and_prefix_reuse(models):
    check_batched_prefill_decode_and_prefix_reuse(models)


def test_chunked_prefill(models):
    check_chunked_prefill(models)


def test_greedy_matches_hf_generate(models):
    check_greedy_matches_hf_generate(models)
