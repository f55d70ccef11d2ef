"""AWQ and GPTQ int4 checkpoints (services/executor/quantization/awq.py, gptq.py, int4_linear.py).

Checkpoints come from the tests' own round-to-nearest quantizer (tests/int4_quantizer.py), written in
each published layout; the reference is the float weight the codes stand for. Tiny random Llama and Qwen2
models: our ModelRunner on the int4 checkpoint against transformers running the DEQUANTIZED weights, in
float32 on the CPU (where the linear layers dequantize and F.linear: the same weights, so logits agree to
hf_parity's atol 1e-4, from op order), greedy tokens equal; tensor parallelism (tp=2 over gloo) gives the
logits of tp=1 to 1e-5 for AWQ and for GPTQ act-order (each rank gathering its rows' groups). One model
also runs its linears through the Triton kernels (interpreter), to the bf16-rounding tolerance of the
dot path.
"""

import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.executor import quantization  # noqa: E402
from radixserve.executor.layers import linear as linear_mod  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402
from radixserve.executor.warmup import Warmup  # noqa: E402
from radixserve.kernels import int4_gemm  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.hf_parity import (  # noqa: E402
    CONFIGS,
    build_hf_model,
    check_batched_prefill_decode_and_prefix_reuse,
    check_greedy_matches_hf_generate,
    hf_last_logits,
)
from tests.executor.tiny_llama import TINY_CONFIG  # noqa: E402
from tests.int4_quantizer import (  # noqa: E402
    awq_tensors,
    groups_of,
    gptq_tensors,
    quantization_config,
    quantize,
    quantize_hf_model,
)
from tests.tp_ranks import ATOL as TP_ATOL, build_runner, on_cpu, run_group, scenario  # noqa: E402

# ----------------------------------------------------------------------------- one linear layer

LAYER_CASES = {
    "awq-g32": ("awq", 32, False),
    "awq-g64": ("awq", 64, False),
    "awq-g128": ("awq", 128, False),
    "gptq-g128": ("gptq", 128, False),
    "gptq-one-group": ("gptq", -1, False),
    "gptq-act-order-g32": ("gptq", 32, True),
    "gptq-act-order-g24": ("gptq", 24, True),  # not a multiple of 16: per-row groups in the kernel
}


def _layer(method, group, desc_act, k=192, n=48, bias=True):
    g = torch.Generator().manual_seed(group + 7 * desc_act)
    w = torch.randn(n, k, generator=g) * 0.1
    qz = quantize(w, groups_of(k, group, 3 if desc_act else None), min_zero=int(method == "gptq"))
    config = quantization.resolve(
        None, {"quantization_config": quantization_config(method, group, desc_act)}
    )
    with quantization.building_with(config):
        layer = linear_mod.ReplicatedLinear(k, n, bias=bias)
    tensors = awq_tensors(qz) if method == "awq" else gptq_tensors(qz)
    tensors["bias"] = torch.randn(n, generator=g)
    for name, param in layer.named_parameters():
        param.weight_loader(param, tensors[name])
    layer.process_weights_after_loading()
    return layer, qz.dequantized, tensors["bias"]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_computes_the_dequantized_weight(case):
    layer, deq, bias = _layer(*LAYER_CASES[case])
    assert not any(True for _ in layer.parameters() if _ is not layer.bias)  # repacked, freed
    assert layer.quant.weight_bytes(layer) < deq.numel()  # ~half a byte per weight
    x = torch.randn(5, deq.shape[1], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), F.linear(x, deq, bias), atol=1e-5, rtol=1e-5)


def test_layer_through_the_kernel(monkeypatch):
    monkeypatch.setattr(int4_gemm, "KERNEL_DEVICES", ("cuda", "cpu"))
    for case in ("awq-g64", "gptq-act-order-g32"):
        layer, deq, bias = _layer(*LAYER_CASES[case])
        for m in (1, 6):
            x = torch.randn(m, deq.shape[1], generator=torch.Generator().manual_seed(m))
            torch.testing.assert_close(layer(x), F.linear(x, deq, bias), atol=1e-5, rtol=1e-5)


def test_fused_act_order_shards_must_share_g_idx():
    qc = quantization_config("gptq", 32, desc_act=True)
    with quantization.building_with(quantization.resolve(None, {"quantization_config": qc})):
        layer = linear_mod.MergedColumnParallelLinear(64, [16, 16])
    a, b = groups_of(64, 32, 1), groups_of(64, 32, 2)
    layer.g_idx.weight_loader(layer.g_idx, a, 0)
    layer.g_idx.weight_loader(layer.g_idx, a, 1)  # gate and up with one act order: fine
    with pytest.raises(ValueError, match="different g_idx"):
        layer.g_idx.weight_loader(layer.g_idx, b, 1)


def test_checkpoint_configs():
    awq = quantization.resolve(None, {"quantization_config": quantization_config("awq", 64)})
    assert awq.describe() == "awq int4 (group 64, checkpoint)"
    gptq = quantization.resolve(
        "gptq", {"quantization_config": quantization_config("gptq", 128, True)}
    )
    assert gptq.describe() == "gptq int4 (group 128, act-order, checkpoint)"
    assert "random weights" in quantization.resolve("awq", {}).describe()
    bad = [
        {**quantization_config("awq", 128), "bits": 8},
        {**quantization_config("awq", 128), "version": "gemv"},
        {**quantization_config("awq", 128), "zero_point": False},
        {**quantization_config("gptq", 128), "checkpoint_format": "marlin"},
        {**quantization_config("gptq", 100)},
    ]
    for qc in bad:
        with pytest.raises(ValueError):
            quantization.resolve(None, {"quantization_config": qc})
    with pytest.raises(ValueError, match="already quantized"):
        quantization.resolve("gptq", {"quantization_config": quantization_config("awq", 128)})


# ----------------------------------------------------------------------------- tiny models vs HF

MODEL_CASES = {
    "llama-awq-g32": ("llama", "awq", 32, False),
    "llama-gptq-act-order-g32": ("llama", "gptq", 32, True),
    "qwen2-gptq-g128": ("qwen2", "gptq", 128, False),
}


def quantized_model(folder, config, method, group, desc_act):
    hf = build_hf_model(config, folder / "float")
    quantize_hf_model(hf, folder / "int4", method, group, desc_act)
    return hf, folder / "int4"


@pytest.fixture(scope="module", params=MODEL_CASES, ids=str)
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf, path = quantized_model(folder, *MODEL_CASES[request.param])
    runner = ModelRunner(
        path,
        runner_config(
            dtype="float32", device="cpu", max_total_tokens=1024, attention_backend="torch_native"
        ),
    )
    return hf, runner


def test_tiny_models_match_hf_on_dequantized_weights(models):
    hf, runner = models
    assert runner.model.quant_config.name in ("awq", "gptq")
    check_batched_prefill_decode_and_prefix_reuse(models)
    check_greedy_matches_hf_generate(models)


def test_tiny_model_through_the_kernels(tmp_path, monkeypatch):
    """The same parity with the linears on the Triton kernels (bf16 dot operands; interpreter on CPU)."""
    monkeypatch.setattr(int4_gemm, "KERNEL_DEVICES", ("cuda", "cpu"))
    hf, path = quantized_model(tmp_path, "llama", "gptq", 32, True)
    runner = ModelRunner(
        path,
        runner_config(
            dtype="float32", device="cpu", max_total_tokens=256, attention_backend="torch_native"
        ),
    )
    from radixserve.common.step import NewRequest, StepInput

    prompt = [5, 9, 33, 2, 100]
    out = runner.step(StepInput(1, new_requests=[NewRequest("k", prompt, [1, 2, 3, 4, 5])]))
    torch.testing.assert_close(out.logits[0], hf_last_logits(hf, prompt), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- tensor parallelism


@pytest.mark.parametrize(
    "method, desc_act", [("awq", False), ("gptq", True)], ids=["awq", "gptq-act-order"]
)
def test_two_shards_match_one(tmp_path, method, desc_act):
    """o_proj and down_proj split their input rows: AWQ slices scales by group; GPTQ act-order keeps
    every group's scales on each rank and gathers them per row through its rows' g_idx."""
    quantized_model(tmp_path, CONFIGS["llama"](), method, 32, desc_act)
    path = tmp_path / "int4"
    expected = on_cpu(scenario(build_runner(str(path))))
    got = run_group(path, tmp_path / "tp2.pt")
    for part in ("prefill", "decode", "chunked"):
        torch.testing.assert_close(got[part], expected[part], atol=TP_ATOL, rtol=TP_ATOL, msg=part)
    assert got["greedy"] == expected["greedy"]


# ----------------------------------------------------------------------------- dummy weights, warm-up


def test_dummy_awq_weights(tmp_path):
    """--load-format dummy --quantization awq on an unquantized config: random valid int4 (group 128)."""
    (tmp_path / "config.json").write_text(
        json.dumps({**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256})
    )
    runner = ModelRunner(
        tmp_path,
        runner_config(
            dtype="bfloat16",
            device="cpu",
            load_format="dummy",
            quantization="awq",
            random_seed=0,
            max_total_tokens=256,
        ),
    )
    from radixserve.common.step import NewRequest, StepInput

    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.int4.group_size == 128 and qkv.int4.packed.dtype == torch.int32
    assert runner.model.lm_head.quant is None  # the LM head stays bf16
    w = int4_gemm.dequantize_reference(qkv.int4)
    assert 0.005 < w.std().item() < 0.05  # about std 0.02, like the float dummy weights
    out = runner.step(StepInput(1, new_requests=[NewRequest("d", [3, 4, 5], [1, 2, 3])]))
    assert torch.isfinite(out.logits).all()


def test_bench_one_batch_with_dummy_awq(tmp_path, capsys):
    """`radixserve bench one-batch --load-format dummy --quantization awq` (the lead's GPU timing)."""
    from radixserve.bench import one_batch

    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, "hidden_size": 128}))
    argv = ["--model-path", str(tmp_path), "--load-format", "dummy", "--quantization", "awq"]
    argv += ["--device", "cpu", "--batch-size", "1", "--input-len", "8", "--output-len", "3"]
    assert one_batch.main(argv) == 0
    (record,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x[:1] == "{"]
    assert record["batch_size"] == 1 and record["median_decode_latency"] > 0


def test_gpu_warmup_reaches_every_kernel_class():
    """The warm-up's GPU plan runs steps of every M class of the int4 kernels (and the dequantize +
    cuBLAS path), so that no class compiles on first traffic."""
    rows = []

    class Recorder:
        def step(self, step):
            tokens = sum(len(r.input_ids) for r in step.new_requests)
            tokens += sum(max(1, len(r.input_ids)) for r in step.continuing_requests)
            rows.append(tokens)

        def reset(self):
            pass

    args = types.SimpleNamespace(max_prefill_tokens=16384, chunked_prefill_size=8192)
    Warmup(
        Recorder(),
        kv_slots=200_000,
        vocab_size=1000,
        max_prefill_tokens=args.max_prefill_tokens,
        chunked_prefill_size=args.chunked_prefill_size,
        max_running_requests=64,
        graph_max_bs=16,
        on_gpu=True,
    ).run()
    classes = {id(int4_gemm.config_for(m)) for m in rows if 0 < m < int4_gemm.DEQUANT_MIN_M}
    served, smallest = (
        set(),
        1,
    )  # the classes a CUDA step can use: those starting below DEQUANT_MIN_M
    for largest, config in int4_gemm.M_CLASSES:
        if smallest < int4_gemm.DEQUANT_MIN_M:
            served.add(id(config))
        smallest = (largest or smallest) + 1
    assert classes == served and len(served) >= 3
    assert max(rows) >= int4_gemm.DEQUANT_MIN_M
