"""fp8 weights (quantization/fp8.py, compressed_tensors.py): checkpoints in each published layout, online
fp8 of a bf16 model, tensor parallelism, and the NLL check on the embedded SmolLM2.

Published layouts are written here from a tiny random HF Llama (hf_parity.build_hf_model, fp32): HF fp8
with 16x16 block scales (weight_scale_inv); HF fp8 per-tensor with static input scales; compressed-tensors
per-channel with an ignore list. Our runner (CPU: the weight dequantized to fp32, then F.linear) is
compared with transformers running the DEQUANTIZED weights: the same products, so hf_parity's fp32
tolerance (logits atol 1e-4) and equal greedy tokens hold.

Online fp8 (per-channel scales) changes the weights by up to 2^-4 of each value (e4m3's 3 mantissa bits,
round to nearest: <= 1/16 relative): on the tiny model the logits stay within 5% of their range of
the unquantized ones (measured ~1-2%).
"""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.common.step import (  # noqa: E402
    ContinuingRequest,
    NewRequest,
    PromptLogprobRange,
    StepInput,
)
from radixserve.executor.quantization import resolve  # noqa: E402
from radixserve.executor.runner import ModelRunner  # noqa: E402
from radixserve.kernels import fp8_gemm  # noqa: E402
from tests.configs import runner_config  # noqa: E402
from tests.executor.hf_parity import (  # noqa: E402
    CONFIGS,
    build_hf_model,
    check_batched_prefill_decode_and_prefix_reuse,
    check_greedy_matches_hf_generate,
    hf_last_logits,
    prompts,
)
from tests.tp_ranks import GREEDY_TOKENS, build_runner, on_cpu, run_group, scenario  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = (16, 16)
IGNORED = "model.layers.1.mlp.down_proj"

LAYOUTS = {
    "fp8_block": {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [16, 16],
    },
    "fp8_tensor_static": {"quant_method": "fp8", "activation_scheme": "static"},
    "ct_channel": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
            }
        },
        "ignore": ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"],
    },
}


def _quantized_tensors(name: str, w: torch.Tensor, layout: str) -> tuple[dict, torch.Tensor]:
    """The checkpoint tensors of linear weight `name` in layout, and the weight they dequantize to."""
    prefix = name[: -len(".weight")]
    if layout == "fp8_block":
        wq, s = fp8_gemm.quantize_weight(w, BLOCK)
        return {name: wq, f"{prefix}.weight_scale_inv": s}, fp8_gemm.dequantize_weight(
            wq, s, BLOCK, torch.float32
        )
    if layout == "ct_channel":
        wq, s = fp8_gemm.quantize_weight(w)
        return {name: wq, f"{prefix}.weight_scale": s[:, None].contiguous()}, (
            fp8_gemm.dequantize_weight(wq, s, None, torch.float32)
        )
    # per tensor (0-d scales, as published), static input scale; q/k/v and gate/up get different scales
    scale = w.abs().max() / fp8_gemm.FP8_MAX
    wq = (w / scale).clamp(-448, 448).to(fp8_gemm.FP8)
    tensors = {name: wq, f"{prefix}.weight_scale": scale, f"{prefix}.input_scale": scale * 40}
    return tensors, wq.float() * scale


def write_checkpoint(src, dst, layout: str) -> dict:
    """dst: src's model in `layout`; returns the state dict of the dequantized model (HF names)."""
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    out, dequantized = {}, {}
    for name, tensor in state.items():
        module = name.rsplit(".", 1)[0]
        is_linear = name.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJECTIONS
        if not is_linear or (layout == "ct_channel" and module == IGNORED):
            out[name], dequantized[name] = tensor, tensor
            continue
        tensors, dequantized[name] = _quantized_tensors(name, tensor, layout)
        out.update(tensors)
    save_file(out, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = LAYOUTS[layout]
    (dst / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "generation_config.json", dst / "generation_config.json")
    return dequantized


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    hf = build_hf_model("llama", folder)
    return folder, hf


def _runner(folder, quantization=None, dtype="float32"):
    return ModelRunner(
        folder,
        runner_config(
            dtype=dtype,
            device="cpu",
            max_total_tokens=1024,
            quantization=quantization,
            random_seed=0,
        ),
    )


@pytest.fixture(scope="module", params=list(LAYOUTS))
def checkpoint_models(request, hf_folder, tmp_path_factory):
    src, hf = hf_folder
    dst = tmp_path_factory.mktemp(request.param) / "model"
    dequantized = write_checkpoint(src, dst, request.param)
    reference = build_hf_model(CONFIGS["llama"](), tmp_path_factory.mktemp("ref"))
    reference.load_state_dict(dequantized)
    return request.param, reference, _runner(dst)


def test_checkpoint_logits_match_hf_on_the_dequantized_weights(checkpoint_models):
    layout, reference, runner = checkpoint_models
    check_batched_prefill_decode_and_prefix_reuse((reference, runner))


def test_checkpoint_greedy_tokens_match_hf(checkpoint_models):
    layout, reference, runner = checkpoint_models
    check_greedy_matches_hf_generate((reference, runner))


def test_checkpoint_layers_hold_fp8_and_the_ignored_layer_stays_plain(checkpoint_models):
    layout, _, runner = checkpoint_models
    layers = runner.model.model.layers
    qkv = layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == fp8_gemm.FP8
    if layout == "fp8_block":
        assert qkv.weight_scale.shape == (qkv.out_features // 16, qkv.in_features // 16)
    else:
        assert qkv.weight_scale.shape == (qkv.out_features,)  # rowwise
    if layout == "fp8_tensor_static":
        # q, k and v keep their own scales (rows); the one input scale is the max of theirs
        assert len(set(qkv.weight_scale.tolist())) == 3
        assert qkv.input_scale.dim() == 0
    down = layers[1].mlp.down_proj
    if layout == "ct_channel":
        assert down.quant is None and down.weight.dtype == torch.float32
    else:
        assert down.weight.dtype == fp8_gemm.FP8
    assert "fp8" in runner.model.quant_config.describe()


def test_online_fp8_is_close_to_the_unquantized_model(hf_folder):
    folder, hf = hf_folder
    plain, fp8 = _runner(folder), _runner(folder, "fp8")
    down = fp8.model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == fp8_gemm.FP8 and down.weight_scale.shape == (down.out_features,)
    ids = prompts(3, 9, 4)
    for runner in (plain, fp8):
        runner.reset()
    pool = list(range(1, 20))
    step = StepInput(
        1, new_requests=[NewRequest("a", ids[0], pool[:9]), NewRequest("b", ids[1], pool[9:13])]
    )
    got, ref = fp8.step(step).logits, plain.step(step).logits
    span = (ref.max() - ref.min()).item()
    assert (got - ref).abs().max().item() < 0.05 * span
    assert not torch.equal(got, ref)  # quantized for real
    for i, p in enumerate(ids):
        torch.testing.assert_close(ref[i], hf_last_logits(hf, p), atol=1e-4, rtol=0)


def test_online_fp8_with_dummy_weights_quantizes_the_drawn_bf16_weight(hf_folder):
    folder, _ = hf_folder
    cfg = dict(
        dtype="bfloat16", device="cpu", max_total_tokens=256, random_seed=0, load_format="dummy"
    )
    plain = ModelRunner(folder, runner_config(**cfg))
    fp8 = ModelRunner(folder, runner_config(**cfg, quantization="fp8"))
    w = plain.model.model.layers[0].mlp.gate_up_proj.weight
    layer = fp8.model.model.layers[0].mlp.gate_up_proj
    back = fp8_gemm.dequantize_weight(layer.weight, layer.weight_scale, None, torch.float32)
    assert ((back - w.float()).abs() <= w.float().abs() / 16 + 1e-6).all()


def test_dummy_weights_in_a_checkpoint_layout(tmp_path, hf_folder):
    src, _ = hf_folder
    write_checkpoint(src, tmp_path / "m", "fp8_block")
    runner = ModelRunner(
        tmp_path / "m",
        runner_config(dtype="float32", device="cpu", max_total_tokens=256, load_format="dummy"),
    )
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == fp8_gemm.FP8 and torch.isfinite(qkv.weight.float()).all()
    out = runner.step(StepInput(1, new_requests=[NewRequest("a", [5, 6, 7], [1, 2, 3])]))
    assert torch.isfinite(out.logits).all()


def test_resolve_rejects_what_it_cannot_load():
    with pytest.raises(ValueError, match="static activations"):
        resolve(
            None, {"quantization_config": {**LAYOUTS["fp8_block"], "activation_scheme": "static"}}
        )
    int4 = json.loads(json.dumps(LAYOUTS["ct_channel"]))
    int4["config_groups"]["group_0"]["weights"] = {
        "num_bits": 4,
        "type": "int",
        "strategy": "group",
    }
    with pytest.raises(ValueError, match="only fp8 weights"):
        resolve(None, {"quantization_config": int4})
    with pytest.raises(ValueError, match="needs a compressed-tensors checkpoint"):
        resolve("compressed-tensors", {})
    with pytest.raises(ValueError, match="already quantized"):
        resolve("awq", {"quantization_config": LAYOUTS["fp8_block"]})


@pytest.mark.parametrize("layout", [None, "fp8_block"])
def test_two_shards_match_one(layout, tmp_path, hf_folder):
    """tp=2 on the CPU (gloo) gives tp=1's logits and greedy tokens: online fp8 (per-channel scales, each
    rank quantizing its slice, rows whole) and 16x16 block scales (slices of whole blocks)."""
    src, _ = hf_folder
    folder, quantization = src, "fp8"
    if layout is not None:
        folder, quantization = tmp_path / "m", None
        write_checkpoint(src, folder, layout)
    expected = on_cpu(scenario(build_runner(str(folder), quantization=quantization)))
    got = run_group(folder, tmp_path / "tp2.pt", quantization=quantization)
    for part in ("prefill", "decode", "chunked"):
        torch.testing.assert_close(got[part], expected[part], atol=1e-5, rtol=1e-5, msg=part)
    assert len(got["greedy"]) == GREEDY_TOKENS and got["greedy"] == expected["greedy"]


# -- the check on the embedded SmolLM2 ------------------------------------------------------

TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 "
    "to 1889. Locally nicknamed the iron lady, it was constructed as the centerpiece of the 1889 "
    "World's Fair. Water boils at one hundred degrees Celsius at sea level, and it freezes at zero "
    "degrees. The human heart pumps blood through the body, carrying oxygen from the lungs to every "
    "organ. In 1969, Neil Armstrong became the first person to walk on the Moon during the Apollo 11 "
    "mission. Python is a popular programming language known for its readable syntax and large "
    "standard library. The Amazon rainforest covers much of the Amazon basin of South America and is "
    "home to millions of species of insects, plants, birds and other forms of life. Shakespeare wrote "
    "many famous plays, including Hamlet, Macbeth and Romeo and Juliet, which are still performed "
    "around the world today."
)
# 210 tokens: on 77 the NLL moved by +-1% between quantizations as mere noise (per-channel +2.5%,
# 128x128 blocks -0.9%); on these, per-channel measures +1.6% and blocks +0.7% in float32.


def _nll(runner, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] given their prefixes (the prompt logprobs of one prefill)."""
    runner.reset()
    rng = PromptLogprobRange(0, len(ids) - 1)
    request = NewRequest("t", ids, list(range(1, len(ids) + 1)), prompt_logprobs=rng)
    out = runner.step(StepInput(1, new_requests=[request]))
    logprobs = out.prompt_logprobs[0].logprobs
    assert [lp.token_id for lp in logprobs] == ids[1:]
    return -sum(lp.logprob for lp in logprobs) / len(logprobs)


def _greedy(runner, ids: list[int], n: int) -> list[int]:
    runner.reset()
    out = runner.step(
        StepInput(1, new_requests=[NewRequest("g", ids, list(range(1, len(ids) + 1)))])
    )
    tokens = [out.outputs[0].token_id]
    for i in range(n - 1):
        slot = len(ids) + 1 + i
        out = runner.step(StepInput(2 + i, continuing_requests=[ContinuingRequest("g", [slot])]))
        tokens.append(out.outputs[0].token_id)
    return tokens


def test_smollm2_fp8_nll_within_2_percent_and_the_capital_of_france_unchanged():
    from transformers import AutoTokenizer

    from radixserve.common.model_files import resolve_model_path

    folder = resolve_model_path(None)
    tok = AutoTokenizer.from_pretrained(folder)
    text_ids = tok(TEXT)["input_ids"]
    chat_text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    chat = tok(chat_text, add_special_tokens=False)["input_ids"]
    nll, answers = {}, {}
    # The reference is the dequantized model ("unquant"): the CPU default runs the GGUF's Q4_1 blocks
    # natively, whose numerics depend on the CPU's instruction set (0.6% of NLL apart on one machine).
    for quantization in ("unquant", "fp8"):
        runner = _runner(folder, quantization)
        nll[quantization] = _nll(runner, text_ids)
        answers[quantization] = _greedy(runner, chat, 6)
        del runner
    assert math.isfinite(nll["unquant"]) and nll["unquant"] < 4.0, nll
    assert abs(nll["fp8"] - nll["unquant"]) <= 0.02 * nll["unquant"], nll
    assert answers["fp8"] == answers["unquant"], answers
    assert "Paris" in tok.decode(answers["fp8"])
