"""--kv-cache-dtype fp8_e5m2 | fp8_e4m3 on the tiny random Llama: the pool's size and dtype, the
scales' precedence, and what a model run with an fp8 pool computes against the same model with its
KV in the model's dtype."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # the triton backend's kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.common.step import ContinuingRequest, StepInput
from radixserve.executor import kv_cache
from radixserve.executor.kv_scales import (
    KVScales,
    resolve_kv_scales,
    scales_from_checkpoint,
    split_checkpoint_scales,
)
from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from tests.executor.tiny_llama import TINY_CONFIG, new

FP8 = ["fp8_e5m2", "fp8_e4m3"]
LAYERS = TINY_CONFIG["num_hidden_layers"]


def make_runner(model_dir, kv_cache_dtype="auto", dtype="bfloat16", **kw):
    kw.setdefault("max_total_tokens", 400)
    runner = ModelRunner(
        model_dir,
        runner_config(
            dtype=dtype,
            device="cpu",
            load_format="dummy",
            random_seed=0,
            kv_cache_dtype=kv_cache_dtype,
            **kw,
        ),
    )
    # Dummy weights (std 0.02) give near-flat logits whose argmax any rounding flips; scaled up the
    # same way in every runner, greedy tokens mean something.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in runner.model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    return runner


def greedy(runner, prompt, steps, rid="a", first_slot=1, prefix_slots=()):
    """Prefill prompt, then decode `steps` tokens; the logits of every step and the tokens."""
    n = len(prompt)
    slots = list(range(first_slot, first_slot + n))
    out = runner.step(
        StepInput(1, new_requests=[new(rid, prompt, slots, prefix_slots=list(prefix_slots))])
    )
    logits, tokens = [out.logits[0].float()], [out.outputs[0].token_id]
    for i in range(steps):
        out = runner.step(
            StepInput(2 + i, continuing_requests=[ContinuingRequest(rid, [first_slot + n + i])])
        )
        logits.append(out.logits[0].float())
        tokens.append(out.outputs[0].token_id)
    return torch.stack(logits), tokens


PROMPT = [5, 17, 33, 9, 101, 64, 12, 7, 90, 3, 44, 21]


@pytest.fixture(scope="module")
def bf16_run(model_dir):
    return greedy(make_runner(model_dir), PROMPT, 8)


@pytest.mark.parametrize("kv_cache_dtype", FP8)
def test_fp8_pool_holds_fp8_and_reports_it(model_dir, kv_cache_dtype):
    runner = make_runner(model_dir, kv_cache_dtype)
    want = {"fp8_e5m2": torch.float8_e5m2, "fp8_e4m3": torch.float8_e4m3fn}[kv_cache_dtype]
    assert runner.kv_pool.fp8 and all(t.dtype == want for t in runner.kv_pool.k + runner.kv_pool.v)
    assert runner.fast_decode is None  # the fused CPU decode reads bf16 KV only: skipped for fp8
    info = runner.model_info()
    per_token_bf16 = 2 * LAYERS * TINY_CONFIG["num_key_value_heads"] * 8 * 2  # head_dim 8, 2 bytes
    assert info.kv_cache_dtype == kv_cache_dtype and info.kv_bytes_per_token == per_token_bf16 // 2
    assert make_runner(model_dir).model_info().kv_cache_dtype == "bfloat16"


@pytest.mark.parametrize("kv_cache_dtype", FP8)
def test_fp8_kv_logits_close_and_greedy_tokens_equal(model_dir, bf16_run, kv_cache_dtype):
    ref_logits, ref_tokens = bf16_run
    logits, tokens = greedy(make_runner(model_dir, kv_cache_dtype), PROMPT, 8)
    assert tokens == ref_tokens  # so both runs decoded the same inputs
    # The prefill attends over its fresh K/V (bf16, not read back from the pool): same logits.
    torch.testing.assert_close(logits[0], ref_logits[0], atol=0, rtol=0)
    # Decode steps read fp8 K/V: within 5% of the largest |logit| (measured: e5m2 3%, e4m3 1.5%).
    spread = ref_logits.abs().max().item()
    assert (logits - ref_logits).abs().max().item() < 0.05 * spread


@pytest.mark.parametrize("kv_cache_dtype", FP8)
def test_prefix_cached_continuation_reads_the_fp8_prefix(model_dir, kv_cache_dtype):
    # A request that reuses another's first 8 slots as its cached prefix gets what the whole prompt
    # run at once gets (both read the same fp8 prefix), and stays close to the bf16 answer.
    runner = make_runner(model_dir, kv_cache_dtype)
    greedy(runner, PROMPT[:8], 0, rid="first", first_slot=1)
    cont, cont_tokens = greedy(
        runner, PROMPT[8:], 4, rid="second", first_slot=100, prefix_slots=range(1, 9)
    )
    bf16 = make_runner(model_dir)
    ref, ref_tokens = greedy(bf16, PROMPT, 4)
    assert cont_tokens == ref_tokens
    assert (cont - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_pool_holds_twice_the_tokens_at_the_same_memory(model_dir, monkeypatch):
    # The server's sizing path (ModelRunner -> compute_kv_slots) with a fixed memory figure.
    monkeypatch.setattr(kv_cache, "mem_available_bytes", lambda: 3 * 2**20)
    sizes = {
        name: make_runner(model_dir, name, max_total_tokens=None, mem_fraction_static=0.5).kv_slots
        - 1  # slot 0 is the padding sink
        for name in ["auto", *FP8]
    }
    assert sizes["auto"] == 3 * 2**20 // 2 // 128  # bf16: 128 bytes per token
    assert sizes["fp8_e5m2"] == sizes["fp8_e4m3"] == 2 * sizes["auto"]


def test_scales_divide_on_store_and_multiply_on_read(model_dir):
    # Scales != 1 go through the pool: stored x / scale, read back stored * scale; the answers
    # (decode and an extend over the cached prefix) stay close to bf16's.
    plain = make_runner(model_dir, "fp8_e4m3")
    scaled = make_runner(model_dir, "fp8_e4m3")
    scaled.kv_pool.scales = KVScales((0.05,) * LAYERS, (4.0,) * LAYERS, "test")
    for runner in (plain, scaled):
        greedy(runner, PROMPT[:8], 0, rid="first", first_slot=1)
    # Layer 0 stores the same k and v in both (later layers see the fp8 noise of earlier ones): one
    # fp8 grid or the other, so within one e4m3 step (2**-3 relative).
    for stored, ref, scale in (
        (scaled.kv_pool.k[0], plain.kv_pool.k[0], 0.05),
        (scaled.kv_pool.v[0], plain.kv_pool.v[0], 4.0),
    ):
        torch.testing.assert_close(
            stored[1:9].float() * scale, ref[1:9].float(), rtol=2**-3, atol=2**-9 * 4
        )
    cont, tokens = greedy(
        scaled, PROMPT[8:], 3, rid="second", first_slot=100, prefix_slots=range(1, 9)
    )
    ref, ref_tokens = greedy(make_runner(model_dir), PROMPT, 3)
    assert tokens == ref_tokens
    assert (cont - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_triton_backend_with_fp8_kv(model_dir):
    # One fp8 dtype here (the kernel tests take both): the interpreter is slow. The GPU backend (fused rotary + fp8 store, paged extend and split-KV decode reading fp8; on
    # the CPU in the interpreter, fp32 model) against torch_native with fp32 KV, scales != 1; the
    # continuation extends over a cached fp8 prefix.
    runner = make_runner(model_dir, "fp8_e5m2", dtype="float32", attention_backend="triton")
    runner.kv_pool.scales = KVScales((0.5,) * LAYERS, (2.0,) * LAYERS, "test")
    ref, ref_tokens = greedy(make_runner(model_dir, dtype="float32"), PROMPT, 4)
    greedy(runner, PROMPT[:8], 0, rid="first", first_slot=1)
    cont, tokens = greedy(
        runner, PROMPT[8:], 4, rid="second", first_slot=100, prefix_slots=range(1, 9)
    )
    assert tokens == ref_tokens
    assert (cont - ref).abs().max().item() < 0.05 * ref.abs().max().item()


# --- where the scales come from ------------------------------------------------------------------


def test_checkpoint_scales_are_split_off_the_weights():
    found: dict[str, float] = {}
    weights = [
        ("model.layers.0.self_attn.q_proj.weight", torch.ones(2)),
        ("model.layers.0.self_attn.k_scale", torch.tensor(0.5)),
        ("model.layers.1.self_attn.v_scale", torch.tensor([2.0])),
        ("model.layers.1.self_attn.kv_scale", torch.tensor(3.0)),
    ]
    kept = [name for name, _ in split_checkpoint_scales(weights, found)]
    assert kept == ["model.layers.0.self_attn.q_proj.weight"] and len(found) == 3
    scales = scales_from_checkpoint(found, 2)
    assert scales.k == (0.5, 3.0) and scales.v[0] == 1.0 and scales.v[1] in (2.0, 3.0)
    assert scales_from_checkpoint({}, 2) is None


def test_param_file_wins_over_the_checkpoint(tmp_path):
    path = tmp_path / "kv_scales.json"
    doc = {"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0": {"0": 0.25, "1": 0.5}}}}
    path.write_text(json.dumps(doc))
    checkpoint = {"model.layers.0.self_attn.k_scale": 9.0}
    assert resolve_kv_scales(str(path), checkpoint, 2, 0).k == (0.25, 0.5)
    assert resolve_kv_scales(str(path), checkpoint, 2, 0).v == (0.25, 0.5)
    assert resolve_kv_scales(None, checkpoint, 2, 0).k == (9.0, 1.0)
    assert resolve_kv_scales(None, {}, 2, 0) == KVScales.ones(2)
    with pytest.raises(ValueError, match="tp rank 1"):
        resolve_kv_scales(str(path), {}, 2, 1)
    with pytest.raises(ValueError, match=r"layer\(s\) \[2\]"):
        resolve_kv_scales(str(path), {}, 3, 0)
    path.write_text(json.dumps({"kv_cache": {"scaling_factor": {"0": {"0": 0.0, "1": 1.0}}}}))
    with pytest.raises(ValueError, match="positive"):
        resolve_kv_scales(str(path), {}, 2, 0)
    path.write_text("not json")
    with pytest.raises(ValueError, match="not a KV-cache scales file"):
        resolve_kv_scales(str(path), {}, 2, 0)


def test_runner_reads_the_param_file(model_dir, tmp_path):
    path = tmp_path / "kv_scales.json"
    path.write_text(json.dumps({"kv_cache": {"scaling_factor": {"0": {"0": 0.5, "1": 2.0}}}}))
    runner = make_runner(model_dir, "fp8_e5m2", quantization_param_path=str(path))
    assert runner.kv_pool.layer_scales(1) == (2.0, 2.0)
    assert make_runner(model_dir, quantization_param_path=str(path)).kv_pool.layer_scales(1) == (
        1.0,
        1.0,
    )  # a bf16 pool ignores it (a warning says so)
