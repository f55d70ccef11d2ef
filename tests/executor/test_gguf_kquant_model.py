"""A tiny Llama in K-quants as a Q4_K_M file lays them out (Q4_K for most linears, Q6_K for some v_proj
and down_proj and the output head, a Q4_K token embedding), through the path the executor takes on the
CPU by default (no --quantization): served natively (the K-quant row kernels, int8 activations) against
the same file dequantized (--quantization unquant). And the fused decode step (bf16): a layer whose qkv
mixes Q4_K and Q6_K rows runs each run into its columns, as a model whose every linear is one run does,
with the torch path's greedy tokens."""

import numpy as np
import pytest
import torch

from radixserve.common.model_files import gguf_source
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.quantization.gguf import GgufConfig, default_native
from radixserve.executor.runner import ModelRunner
from radixserve.kernels import cpu_decode, gguf_cpu
from tests.configs import runner_config
from tests.gguf_files import T, gguf_cpu_extension, quantize
from tests.gguf_files import LLAMA_LINEARS, llama_config, write_llama_gguf

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 768, 4, 2, 3, 320
CONFIG = llama_config(HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB)
# Q4_K_M: Q6_K v and down in some layers (layer 0 here: its qkv is two runs, Q4_K q|k and Q6_K v), Q4_K
# elsewhere; layer 2's down is Q5_K (Q5_K_M's choice) so the three kernels all run.
Q4_K_M = [
    {"attn_v": T.Q6_K, "ffn_down": T.Q6_K},
    {},
    {"ffn_down": T.Q5_K},
]
# Every linear one run of rows (the fused decode step's condition), Q6_K and Q5_K linears included.
UNIFORM = [{"ffn_down": T.Q6_K}, {"attn_output": T.Q6_K}, {"ffn_down": T.Q5_K}]
GREEDY = SamplingParams(temperature=0.0)


def write_model(folder, layer_types, seed=0):
    """A folder as model_files makes from a .gguf (tests/gguf_files.write_llama_gguf), layer i's linears
    Q4_K unless layer_types[i] says otherwise. Weights are normal values quantized by
    tests/gguf_files.quantize_k (a realistic model, not random bytes)."""
    rng = np.random.default_rng(seed)

    def blocks(shape, qtype, std):
        return quantize((rng.standard_normal(shape) * std).astype(np.float32), qtype)

    types = [{part: t.get(part, T.Q4_K) for part in LLAMA_LINEARS.values()} for t in layer_types]
    return write_llama_gguf(folder, CONFIG, types, blocks, rng, (T.Q4_K, 1.0), T.Q6_K)


def runner_for(folder, quantization=None, dtype="float32") -> ModelRunner:
    config = runner_config(
        dtype=dtype, device="cpu", quantization=quantization, max_total_tokens=256
    )
    return ModelRunner(folder, config)


def generate(runner, prompts, steps, forced=None):
    """Prefill, then `steps` steps of all prompts together: per prompt its greedy tokens, and per step the
    float32 logits [prompts, vocab]. Free-running (forced None) the steps are decode steps (the fused
    decode step where it runs); forced: per prompt the tokens to feed instead (another runner's picks),
    each step then a one-token prompt chunk (the torch path), so both runners see the same inputs."""
    runner.reset()
    free = iter(range(1, 1000))
    new = [
        NewRequest(f"r{i}", p, [next(free) for _ in p], sampling=GREEDY)
        for i, p in enumerate(prompts)
    ]
    out = runner.step(StepInput(0, new_requests=new))
    tokens = [[o.token_id] for o in out.outputs]
    logits = [out.logits.float()]
    for s in range(steps):
        if forced is None:
            cont = [ContinuingRequest(f"r{i}", [next(free)]) for i in range(len(prompts))]
        else:
            cont = [
                ContinuingRequest(f"r{i}", [next(free)], [forced[i][s]])
                for i in range(len(prompts))
            ]
        out = runner.step(StepInput(s + 1, continuing_requests=cont))
        for i, o in enumerate(out.outputs):
            tokens[i].append(o.token_id)
        logits.append(out.logits.float())
    return tokens, logits


def assert_close_with_the_same_picks(got_logits, want_logits, tolerance):
    """Each step's logits within tolerance of the largest, and the same greedy pick wherever the
    reference's best token leads by more than TIE_MARGIN (a random tiny model has near-ties: bf16 steps
    logits of 2 by 0.016)."""
    for step, (got, want) in enumerate(zip(got_logits, want_logits)):
        err = (got - want).abs().amax(-1)
        assert (err <= tolerance * want.abs().amax(-1)).all(), (step, err.tolist())
        for row in range(want.shape[0]):
            pick = int(got[row].argmax())
            lead = (want[row].max() - want[row, pick]).item()
            assert pick == int(want[row].argmax()) or lead < TIE_MARGIN, (step, row, lead)


def assert_same_run(got, want, tolerance) -> int:
    """Two free-running generations (tokens, logits): per prompt, step by step, the logits within
    tolerance and the same token, until a step whose picks differ, which must be a near-tie of the
    reference's (its best leads the other pick by under TIE_MARGIN); the prompt's later steps had other
    inputs and are not compared. Returns the decode steps compared."""
    (got_tokens, got_logits), (want_tokens, want_logits) = got, want
    compared = 0
    for i in range(len(want_tokens)):
        for s, (g, w) in enumerate(zip(got_logits, want_logits)):
            err = (g[i] - w[i]).abs().max().item()
            assert err <= tolerance * w[i].abs().max().item(), (i, s, err)
            compared += s > 0
            if got_tokens[i][s] != want_tokens[i][s]:
                lead = (w[i].max() - w[i, got_tokens[i][s]]).item()
                assert lead < TIE_MARGIN, (i, s, lead)
                break
    return compared


def count_fused_steps(runner) -> list:
    """A list that grows by one per step the runner's fused decode step runs."""
    calls = []
    fast = runner.fast_decode
    forward = fast.forward
    fast.forward = lambda batch: calls.append(batch.num_tokens) or forward(batch)
    return calls


PROMPTS = [
    [3, 17, 42, 9, 88, 1],
    [5] * 40,
    [200, 7, 311, 64],
    [9, 150, 33],
    [280, 12, 77, 140, 6, 230, 91],
]


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    gguf_cpu_extension()  # skips where the kernels do not build
    return write_model(tmp_path_factory.mktemp("q4km"), Q4_K_M)


def test_a_q4_k_m_file_runs_natively_by_default(q4_k_m):
    assert default_native(gguf_source(q4_k_m), torch.device("cpu"))
    native = runner_for(q4_k_m)  # no --quantization: the CPU default
    assert isinstance(native.model.quant_config, GgufConfig)
    layers = native.model.model.layers
    # K-quant rows are packed for the kernels (gguf_cpu.pack: 16 rows interleaved, the same bytes)
    q4_k, q5_k, q6_k = (gguf_cpu.PACKED + q for q in (T.Q4_K, T.Q5_K, T.Q6_K))
    assert [q for q, _ in layers[0].self_attn.qkv_proj.weight.gguf_parts] == [q4_k, q6_k]
    assert [q for q, _ in layers[0].mlp.down_proj.weight.gguf_parts] == [q6_k]
    assert [q for q, _ in layers[2].mlp.down_proj.weight.gguf_parts] == [q5_k]
    assert native.model.lm_head.weight.gguf_parts[0][0] == q6_k
    assert native.model.model.embed_tokens.weight.gguf_parts[0][0] == q4_k


def test_native_k_quants_run_the_kernels(q4_k_m, monkeypatch):
    """Every K-quant linear goes to the C++ row kernels (gguf_matmul), none to a per-call dequantize."""
    native = runner_for(q4_k_m)
    module = gguf_cpu.load()
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(module, name)

        def gguf_matmul(self, x, w, qtype, *rest):
            seen.append(qtype)
            return module.gguf_matmul(x, w, qtype, *rest)

    monkeypatch.setattr(gguf_cpu, "load", lambda: Spy())
    monkeypatch.setattr(
        gguf_cpu, "dequantize_torch", lambda *a: pytest.fail("dequantized per call")
    )
    generate(native, PROMPTS[:1], 1)
    assert {gguf_cpu.PACKED + q for q in (T.Q4_K, T.Q5_K, T.Q6_K)} <= set(seen)


# int8 activations (per 32 values) against the dequantized model's float32 ones, through 3 layers and the
# head: logits within 3% of the largest (measured: 1.6% at most in float32, 1.9% in bfloat16; largest
# logits about 2.5); the same greedy pick unless the reference's own leads it by under 0.1.
LOGIT_TOLERANCE, TIE_MARGIN = 0.03, 0.1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_native_q4_k_m_gives_the_dequantized_models_logits_and_tokens(q4_k_m, dtype):
    native = runner_for(q4_k_m, dtype=dtype)
    dequantized = runner_for(q4_k_m, "unquant", dtype=dtype)
    assert dequantized.model.quant_config is None
    # On the reference's tokens (one-token prompt chunks: the torch path in both runners).
    want_tokens, want_logits = generate(dequantized, PROMPTS, 8)
    _, got_logits = generate(native, PROMPTS, 8, forced=want_tokens)
    assert_close_with_the_same_picks(got_logits, want_logits, LOGIT_TOLERANCE)
    # Free-running decode steps as served: in bfloat16 on CPUs with AVX512-BF16 the fused decode step
    # (layer 0's qkv two runs: Q4_K q|k, Q6_K v), else the torch path.
    fused = []
    if dtype == "bfloat16" and cpu_decode.cpu_has_avx512_bf16():
        assert native.fast_decode is not None
        fused = count_fused_steps(native)
    compared = assert_same_run(
        generate(native, PROMPTS, 8), (want_tokens, want_logits), LOGIT_TOLERANCE
    )
    assert compared >= 3 * 8, compared  # (measured: one prompt's run parts at a near-tie in bf16)
    if native.fast_decode is not None:
        assert fused == [len(PROMPTS)] * 8


@pytest.mark.skipif(
    not cpu_decode.cpu_has_avx512_bf16(), reason="the fused CPU decode kernels need AVX512-BF16"
)
@pytest.mark.parametrize("layout", ["uniform", "q4_k_m"])
def test_k_quant_models_run_the_fused_decode_step(tmp_path, monkeypatch, layout):
    """uniform: every linear one run of rows; q4_k_m: layer 0's qkv two runs (Q4_K q|k, Q6_K v), each
    run into its columns. The fused decode steps against the torch path's, free-running."""
    gguf_cpu_extension()
    folder = write_model(tmp_path, UNIFORM if layout == "uniform" else Q4_K_M, seed=1)
    runners = {}
    for enabled in (True, False):
        monkeypatch.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "1" if enabled else "0")
        cpu_decode.reset_for_tests()
        runners[enabled] = runner_for(folder, dtype="bfloat16")
    cpu_decode.reset_for_tests()
    fused, torch_path = runners[True], runners[False]
    assert fused.fast_decode is not None and torch_path.fast_decode is None
    assert (
        fused.fast_decode._lm_head is not None
        and fused.fast_decode._lm_head[1] == gguf_cpu.PACKED + T.Q6_K
    )
    steps = count_fused_steps(fused)
    got, want = generate(fused, PROMPTS, 12), generate(torch_path, PROMPTS, 12)
    assert steps == [len(PROMPTS)] * 12  # every decode step ran fused
    # The linears give the torch path's bits (tests/kernels/test_cpu_decode_gguf.py); the fused step's
    # norms, rotary and attention round as the bf16 fused path does, which the int8 activations magnify
    # (tests/executor/test_fused_gguf_decode.py: 6.8% on the Q4_1 SmolLM2): bound 5% here.
    # (measured, uniform, with packed Q4_K rows: 3 of the 5 prompts part at a near-tie, after decode
    # steps 1, 1 and 4, 2 run all 12; with the file's row order only the first two parted)
    assert assert_same_run(got, want, 0.05) >= 2 * 12
    assert torch.equal(got[1][0], want[1][0])  # the prefill: the torch path in both


def test_a_multi_run_linear_runs_fused_unless_it_has_a_bias():
    """The torch path adds a multi-run linear's bias after rounding each run's output (GgufLinearMethod
    .apply), the fused step before: such a linear keeps the torch path; one run with a bias, or several
    without, run fused; a run of a type without a kernel (Q5_0) keeps the torch path."""
    from types import SimpleNamespace

    from radixserve.executor.fast_decode import gguf_runs

    q4k, q6k = torch.zeros(4, 144, dtype=torch.uint8), torch.zeros(2, 210, dtype=torch.uint8)

    def linear(parts, bias=None):
        return SimpleNamespace(weight=SimpleNamespace(gguf_parts=parts), bias=bias)

    two = [(T.Q4_K, q4k), (T.Q6_K, q6k)]
    assert [q for _, q in gguf_runs(linear(two))] == [T.Q4_K, T.Q6_K]
    assert gguf_runs(linear(two, bias=torch.zeros(6))) is None
    assert gguf_runs(linear(two[:1], bias=torch.zeros(4))) is not None
    assert gguf_runs(linear([(T.Q4_K, q4k), (T.Q5_0, q6k)])) is None
