"""A .gguf served with its blocks as stored (quantization/gguf.py; the CPU default for files the kernels
cover) against the same file dequantized (--quantization unquant): the embedded SmolLM2 Q4_1, and a tiny
Llama of mixed block types written here."""

import numpy as np
import pytest
import torch

from radixserve.common.model_files import gguf_source, resolve_model_path
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.quantization import weight_bytes
from radixserve.executor.quantization.gguf import GgufConfig, default_native, native_config
from radixserve.executor.runner import ModelRunner
from radixserve.kernels import gguf_cpu
from tests.configs import runner_config
from tests.gguf_files import T, llama_config, quantize
from tests.gguf_files import random_blocks, write_llama_gguf

# Tokenized with the model's tokenizer: "The capital of France is", "Once upon a time, there was a
# little", "def fibonacci(n):\n    ", and the chat template around "What is 2+2?".
PROMPTS = [
    [504, 3575, 282, 4649, 314],
    [6403, 1980, 253, 655, 28, 665, 436, 253, 1838],
    [1604, 3987, 46477, 24, 94, 727, 2367],
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407]
    + [
        19712,
        8182,
        2,
        198,
        1,
        4093,
        198,
        1780,
        314,
        216,
        34,
        27,
        34,
        47,
        2,
        198,
        1,
        520,
        9531,
        198,
    ],
]
GREEDY = SamplingParams(temperature=0.0)


def greedy(runner: ModelRunner, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """The greedy tokens after ids, and the logits of the first."""
    runner.reset()
    n = len(ids)
    out = runner.step(
        StepInput(1, new_requests=[NewRequest("r", ids, list(range(1, n + 1)), sampling=GREEDY)])
    )
    first, tokens = out.logits[0].float(), [out.outputs[0].token_id]
    for i in range(steps - 1):
        step = StepInput(i + 2, continuing_requests=[ContinuingRequest("r", [n + 1 + i])])
        tokens.append(runner.step(step).outputs[0].token_id)
    return tokens, first


def runner_for(folder, quantization="gguf", dtype="float32") -> ModelRunner:
    config = runner_config(
        dtype=dtype, device="cpu", quantization=quantization, max_total_tokens=256
    )
    return ModelRunner(folder, config)


@pytest.fixture(scope="module")
def smollm2():
    folder = resolve_model_path(None)
    return runner_for(folder), runner_for(folder, "unquant")


def test_the_embedded_gguf_runs_natively_with_quantization_gguf(smollm2):
    native, dequantized = smollm2
    assert isinstance(native.model.quant_config, GgufConfig)
    assert dequantized.model.quant_config is None
    qkv = native.model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.dtype == torch.uint8 and qkv.shape == (960, 576 // 32 * 20)  # Q4_1 rows, q|k|v
    # On the CPU the rows are packed for the kernels (16 at a time; the same bytes)
    assert qkv.gguf_parts[0][0] == gguf_cpu.PACKED + T.Q4_1
    head = native.model.lm_head
    assert head.weight is native.model.model.embed_tokens.weight  # the tied head reads the Q8_0
    assert head.weight.gguf_parts[0][0] == gguf_cpu.PACKED + T.Q8_0
    # Q4_1 layers + a Q8_0 embedding: under 100 MB read per token (vs 538 MB dequantized in fp32).
    assert weight_bytes(native.model) < 100e6 < 500e6 < weight_bytes(dequantized.model)


def forced_logits(
    runner: ModelRunner, ids: list[int], continuation: list[int]
) -> list[torch.Tensor]:
    """The logits before each token of continuation, fed one decode token at a time (each step a
    request of one token over the previous one's cached slots, so every step runs as decode)."""
    runner.reset()
    n = len(ids)
    out = runner.step(
        StepInput(1, new_requests=[NewRequest("r0", ids, list(range(1, n + 1)), sampling=GREEDY)])
    )
    logits = [out.logits[0].float()]
    for i, token in enumerate(continuation[:-1]):
        slot = n + 1 + i
        req = NewRequest(f"r{i + 1}", [token], [slot], list(range(1, slot)), sampling=GREEDY)
        out = runner.step(StepInput(i + 2, finished_request_ids=[f"r{i}"], new_requests=[req]))
        logits.append(out.logits[0].float())
    return logits


def batched_logits(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """The first prompt's logits at its prefill and `steps - 1` greedy decode steps, with the other
    prompts prefilled and decoded in the same steps."""
    runner.reset()
    starts = [1 + sum(len(p) + steps for p in prompts[:i]) for i in range(len(prompts))]
    new = [
        NewRequest(f"r{i}", p, list(range(s, s + len(p))), sampling=GREEDY)
        for i, (p, s) in enumerate(zip(prompts, starts))
    ]
    logits = [runner.step(StepInput(1, new_requests=new)).logits[0].float()]
    for k in range(steps - 1):
        cont = [
            ContinuingRequest(f"r{i}", [s + len(p) + k])
            for i, (p, s) in enumerate(zip(prompts, starts))
        ]
        logits.append(runner.step(StepInput(k + 2, continuing_requests=cont)).logits[0].float())
    return logits


# int8 activations (per 32 values, as llama.cpp quantizes them) through 30 layers against float32 ones:
# logits within 8% of the largest (measured: 5.6% at most); the same greedy token wherever the
# reference's best token leads the native pick by more than 1 logit (measured: the picks that differ
# are near-ties, at most 0.22 apart).
LOGIT_TOLERANCE, TIE_MARGIN = 0.08, 1.0


def test_native_q4_1_gives_the_dequantized_models_greedy_answers(smollm2):
    native, dequantized = smollm2
    for ids in PROMPTS[:3]:
        want, _ = greedy(dequantized, ids, 6)
        for got, ref in zip(
            forced_logits(native, ids, want), forced_logits(dequantized, ids, want)
        ):
            err = (got - ref).abs().max().item()
            assert err < LOGIT_TOLERANCE * ref.abs().max().item(), err
            pick = int(got.argmax())
            assert pick == int(ref.argmax()) or ref.max() - ref[pick] < TIE_MARGIN


def test_native_weights_are_exactly_the_dequantized_ones(smollm2, monkeypatch):
    """With float activations (the dequantize-then-GEMM path for every row count) the native model is
    the dequantized one: names, the q/k row permutation, the tied Q8_0 head and embedding are right."""
    monkeypatch.setattr(gguf_cpu, "DEQUANTIZE_ROWS", 1)
    native, dequantized = smollm2
    ids = PROMPTS[1]
    want, _ = greedy(dequantized, ids, 4)
    for got, ref in zip(forced_logits(native, ids, want), forced_logits(dequantized, ids, want)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_native_decode_and_greedy_agree_on_a_confident_prompt(smollm2):
    """Free-running greedy (the runner's own decode steps) gives the reference's answer."""
    native, dequantized = smollm2
    assert greedy(native, PROMPTS[3], 8)[0] == greedy(dequantized, PROMPTS[3], 8)[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_requests_logits_do_not_depend_on_its_batch(smollm2, dtype):
    """Bitwise, prefill and decode: a request alone, beside requests of other lengths, and beside one of
    its own length. The decode attention once ran a batch padded to its longest sequence under a mask,
    which changed a sequence's attention in the last bits; the int8 activation rounding (and bf16)
    turned that into logits 0.6-0.8 apart within 3 steps, and under 8 concurrent requests a streamed
    answer differed from the same request's non-streamed one."""
    native = smollm2[0] if dtype == "float32" else runner_for(resolve_model_path(None), dtype=dtype)
    alone = batched_logits(native, PROMPTS[:1], 4)
    for others in (PROMPTS[1:3], [PROMPTS[0][::-1]]):
        for got, ref in zip(batched_logits(native, [PROMPTS[0], *others], 4), alone):
            assert torch.equal(got, ref)


def test_a_gguf_the_cpu_kernels_cover_runs_natively_by_default(tiny_gguf):
    folder = resolve_model_path(None)
    cpu = torch.device("cpu")
    assert isinstance(native_config(None, folder, cpu, "auto"), GgufConfig)
    assert native_config("unquant", folder, cpu, "auto") is None  # the dequantized path
    assert native_config(None, folder, cpu, "dummy") is None
    assert native_config(None, folder, torch.device("cuda"), "auto") is None  # CUDA: opt-in
    # Q4_0 / Q4_1 and the K-quants Q4_K / Q5_K / Q6_K (with F16) all have CPU kernels: native by default.
    assert default_native(gguf_source(tiny_gguf), cpu)
    assert isinstance(native_config(None, tiny_gguf, cpu, "auto"), GgufConfig)
    assert isinstance(native_config("gguf", tiny_gguf, cpu, "auto"), GgufConfig)
    assert native_config("unquant", tiny_gguf, cpu, "auto") is None


# --- a tiny Llama of mixed block types -------------------------------------------------------------

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 96
CONFIG = llama_config(HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB)
# Each layer's types (q/k/v differ, so the fused qkv keeps two runs of rows), by GGUF name.
LAYER_TYPES = {
    "attn_q": T.Q4_0,
    "attn_k": T.Q4_0,
    "attn_v": T.Q6_K,
    "attn_output": T.Q5_K,
    "ffn_gate": T.Q4_K,
    "ffn_up": T.Q4_1,
    "ffn_down": T.F16,
}
K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A folder as model_files makes from a .gguf (tests/gguf_files.write_llama_gguf): K-quant tensors
    random valid blocks, the others normal values quantized."""
    rng = np.random.default_rng(0)

    def blocks(shape, qtype, std):
        if qtype in K_TYPES:
            return random_blocks(shape[0], shape[1], qtype, rng)
        return quantize(rng.standard_normal(shape).astype(np.float32) * std, qtype)

    folder = tmp_path_factory.mktemp("tiny-gguf")
    layers = [LAYER_TYPES] * LAYERS
    return write_llama_gguf(
        folder, CONFIG, layers, blocks, rng, (T.Q8_0, 0.05), T.Q6_K, "tiny.gguf"
    )


def test_a_mixed_type_gguf_llama_matches_its_dequantized_reference(tiny_gguf):
    native, dequantized = runner_for(tiny_gguf), runner_for(tiny_gguf, "unquant")
    qkv = native.model.model.layers[0].self_attn.qkv_proj.weight
    assert [q for q, _ in qkv.gguf_parts] == [
        gguf_cpu.PACKED + q for q in (T.Q4_0, T.Q6_K)
    ]  # q|k, v
    assert native.model.lm_head.weight is not native.model.model.embed_tokens.weight
    for ids in ([3, 17, 42, 9, 88, 1], [5] * 40):  # decode rows, and a longer prefill
        want, _ = greedy(dequantized, ids, 4)
        # Every linear of this file now runs the int8 row kernels (the K-quants included): each step's
        # logits within 2% of the largest, on the reference's tokens; the same greedy pick unless the
        # reference's own leads it by under 2% of the largest (random K-quant bytes make a model of
        # near-ties: a free-running pick once flipped at step 4).
        for got, ref in zip(
            forced_logits(native, ids, want), forced_logits(dequantized, ids, want)
        ):
            spread = ref.abs().max().item()
            assert (got - ref).abs().max().item() < 0.02 * spread
            pick = int(got.argmax())
            assert pick == int(ref.argmax()) or ref.max() - ref[pick] < 0.02 * spread
