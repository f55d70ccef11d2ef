"""The fused CPU decode step (services/executor/fast_decode.py, kernels/cpu_decode.cpp) on the embedded
SmolLM2 served natively from its Q4_1 GGUF: the linears run the GGUF blocks as stored through the torch
path's row dots (kernels/gguf_cpu_kernels.h); the greedy tokens over 64 steps equal the torch path's,
the logits stay within the bf16 path's tolerance of it, a row does not depend on its batch-mates, and a
verify step's rows are the decode steps' rows bit for bit."""

import pytest
import torch

from radixserve.common.config import RunnerConfig
from radixserve.common.model_files import resolve_model_path
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.runner import ModelRunner
from radixserve.kernels import cpu_decode, gguf_cpu

pytestmark = pytest.mark.skipif(
    not cpu_decode.cpu_has_avx512_bf16(), reason="the fused CPU decode kernels need AVX512-BF16"
)

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [
    [1, 9690, 198, 2683, 253, 1789, 4116, 563, 260, 2090, 282, 260, 7220, 6789, 30, 198],
    [1, 4093, 314, 260, 3575, 1345, 282, 4649, 47, 198],
    [1, 504, 2365, 3537, 1672, 30, 216, 33, 3389, 28, 216, 34, 3389, 28, 216, 35, 3389, 28],
]


# Tree drafts need the table's spare rows (the fused runner verifies trees below).
TREES = dict(speculative_algorithm="NGRAM", speculative_ngram_max_bfs_breadth=2)


def make_runner(enabled: bool, monkeypatch, **spec) -> ModelRunner:
    monkeypatch.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "1" if enabled else "0")
    cpu_decode.reset_for_tests()
    try:
        config = RunnerConfig(
            dtype="bfloat16", device="cpu", quantization="gguf", max_total_tokens=1024, **spec
        )
        return ModelRunner(resolve_model_path(None), config, keep_logits=True)
    finally:
        cpu_decode.reset_for_tests()


@pytest.fixture(scope="module")
def runners():
    mp = pytest.MonkeyPatch()
    try:
        fused, ref = make_runner(True, mp, **TREES), make_runner(False, mp)
    finally:
        mp.undo()
    assert fused.fast_decode is not None and ref.fast_decode is None
    return fused, ref


def greedy(runner, prompts, steps):
    """Prefill (torch path), then `steps` decode steps; per request its tokens and per step the logits."""
    runner.reset()
    free = iter(range(1, 1000))
    new = [
        NewRequest(f"r{i}", p, [next(free) for _ in p], sampling=GREEDY)
        for i, p in enumerate(prompts)
    ]
    out = runner.step(StepInput(0, new_requests=new))
    tokens = [[o.token_id] for o in out.outputs]
    logits = []
    for s in range(steps):
        cont = [ContinuingRequest(f"r{i}", [next(free)]) for i in range(len(prompts))]
        out = runner.step(StepInput(s + 1, continuing_requests=cont))
        for i, o in enumerate(out.outputs):
            tokens[i].append(o.token_id)
        logits.append(out.logits.float())
    return tokens, logits


def test_greedy_tokens_equal_torch_path_over_64_steps(runners):
    fused, ref = runners
    got_tokens, got_logits = greedy(fused, PROMPTS[:1], 64)
    ref_tokens, ref_logits = greedy(ref, PROMPTS[:1], 64)
    assert got_tokens == ref_tokens
    diff = max((a - b).abs().max().item() for a, b in zip(got_logits, ref_logits))
    spread = max(b.abs().max().item() for b in ref_logits)
    # The linears give the torch path's bits for the same inputs (tests/kernels/test_cpu_decode_gguf.py);
    # norms, rotary, attention and SiLU round as the bf16 fused path does, and the int8 quantization of
    # the activations inside the linears magnifies those last-bit differences: measured 2.72 of 40.25
    # (6.8%) over these 64 steps, against 0.75 (1.9%) for the bf16 fused path on the same model
    # (--quantization unquant). The greedy tokens above are the requirement; this bounds the drift.
    assert diff <= 0.1 * spread, (diff, spread)


def test_row_does_not_depend_on_batch_mates(runners):
    fused, _ = runners
    alone_tokens, alone_logits = greedy(fused, PROMPTS[:1], 12)
    batch_tokens, batch_logits = greedy(fused, PROMPTS, 12)
    assert batch_tokens[0] == alone_tokens[0]
    for a, b in zip(alone_logits, batch_logits):
        assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("drafts", [1, 4, 15])
def test_verify_rows_equal_fused_decode_rows(runners, drafts):
    fused, _ = runners
    prompt = PROMPTS[0]
    n = len(prompt)
    tokens, logits = greedy(fused, [prompt], drafts + 1)
    tokens = tokens[0]
    fused.reset()
    new = NewRequest("r0", prompt, list(range(1, n + 1)), sampling=GREEDY)
    fused.step(StepInput(0, new_requests=[new]))
    step = ContinuingRequest(
        "r0", list(range(n + 1, n + drafts + 2)), draft_ids=tokens[1 : drafts + 1]
    )
    out = fused.step(StepInput(1, continuing_requests=[step]))
    assert out.outputs[0].accepted_draft_ids == tokens[1 : drafts + 1]
    assert out.outputs[0].token_id == tokens[drafts + 1]
    for j in range(drafts + 1):
        assert torch.equal(out.logits[j].float(), logits[j][0]), j


@pytest.mark.parametrize("threads", [1, 2])
def test_tree_verify_rows_equal_fused_decode_rows(runners, threads):
    """A tree draft through the fused step: each node is a decode row over its own spare table row
    (the prefix, then its branch), so the accepted path's rows are the decode steps' rows bit for bit;
    on two threads the nodes that read an ancestor's K/V stay on its thread."""
    fused, _ = runners
    prompt = PROMPTS[0]
    n = len(prompt)
    tokens, logits = greedy(fused, [prompt], 5)
    tokens = tokens[0]
    wrong = (tokens[1] + 1) % 1000
    # root -> wrong (0) -> tokens[2] (2); root -> tokens[1] (1) -> tokens[2] (3) -> tokens[3] (4)
    ids, parents = [wrong, tokens[1], tokens[2], tokens[2], tokens[3]], [-1, -1, 0, 1, 3]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused.reset()
        new = NewRequest("r0", prompt, list(range(1, n + 1)), sampling=GREEDY)
        fused.step(StepInput(0, new_requests=[new]))
        step = ContinuingRequest(
            "r0", list(range(n + 1, n + 7)), draft_ids=ids, draft_parents=parents
        )
        out = fused.step(StepInput(1, continuing_requests=[step]))
    finally:
        torch.set_num_threads(previous)
    assert out.outputs[0].accepted_draft_ids == tokens[1:4]
    assert out.outputs[0].token_id == tokens[4]
    for j, row in enumerate([0, 2, 4, 5]):
        assert torch.equal(out.logits[row].float(), logits[j][0]), j


def test_unsupported_gguf_linears_keep_the_torch_path(runners, monkeypatch, caplog):
    from radixserve.executor.fast_decode import FastDecode
    from radixserve.kernels import gguf_cpu

    fused, _ = runners
    down = fused.model.model.layers[3].mlp.down_proj.weight
    ((qtype, rows),) = down.gguf_parts
    monkeypatch.setenv("RADIXSERVE_CPU_DECODE_KERNELS", "1")
    cases = [
        (
            [(qtype, rows[:96]), (6, rows[96:])],
            f"GGUF block types [{gguf_cpu.base_type(qtype)}, 6]",
        ),  # a run of Q5_0
        ([(6, rows)], "GGUF block types [6]"),  # Q5_0: no kernel
    ]
    for parts, reason in cases:
        monkeypatch.setattr(down, "gguf_parts", parts)
        with caplog.at_level("INFO", logger="radixserve.executor.fast_decode"):
            assert FastDecode.build(fused) is None
        assert any(reason in r.getMessage() for r in caplog.records), reason
    monkeypatch.setattr(down, "gguf_parts", [(qtype, rows)])
    # The torch path dequantizes when its GGUF kernels are off: the fused linears would differ from it.
    monkeypatch.setattr(gguf_cpu, "load", lambda: None)
    with caplog.at_level("INFO", logger="radixserve.executor.fast_decode"):
        assert FastDecode.build(fused) is None
    assert any("GGUF CPU kernels are off" in r.getMessage() for r in caplog.records)


def last_token_alone(runner, prompt, how, steps, tail=1):
    """The prompt's first-token logits and greedy tokens over `steps` decode steps. how: "uncached" (one
    prefill), "cache_hit" (a first request left the prompt's KV in the cache; the scheduler sends the
    cached slots as prefix_slots and recomputes the last `tail` tokens: the last one alone on a full hit,
    whose logits it needs), or "chunk" (a chunked prefill whose last chunk is the last token)."""
    runner.reset()
    n = len(prompt)
    slots = list(range(1, n + 1))
    after = iter(range(n + 1, 1000))
    if how == "uncached":
        new = NewRequest("r", prompt, slots, sampling=GREEDY)
        out = runner.step(StepInput(0, new_requests=[new]))
    elif how == "cache_hit":
        warm = NewRequest("warm", prompt, slots, sampling=GREEDY)
        runner.step(StepInput(0, new_requests=[warm]))
        tail_slots = [next(after) for _ in range(tail)]
        new = NewRequest("r", prompt[-tail:], tail_slots, slots[:-tail], sampling=GREEDY)
        out = runner.step(StepInput(1, finished_request_ids=["warm"], new_requests=[new]))
    else:
        new = NewRequest("r", prompt[:-1], slots[:-1], sampling=GREEDY, sample=False)
        runner.step(StepInput(0, new_requests=[new]))
        last = ContinuingRequest("r", slots[-1:], prompt[-1:])
        out = runner.step(StepInput(1, continuing_requests=[last]))
    first, tokens = out.logits[-1].float(), [out.outputs[0].token_id]
    for s in range(steps):
        cont = ContinuingRequest("r", [next(after)])
        out = runner.step(StepInput(2 + s, continuing_requests=[cont]))
        tokens.append(out.outputs[0].token_id)
    return first, tokens


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_last_token_alone_runs_as_in_its_prefill(runners, prompt):
    # A prompt's last token run alone (after a full radix-cache hit, or as a 1-token last chunk) is
    # prompt, not decode: it takes the prefill's path (torch), not the fused decode step, which does not
    # equal it bit for bit, so a request's text does not depend on whether its prompt was cached.
    fused, ref = runners
    assert fused.fast_decode is not None
    first, tokens = last_token_alone(fused, prompt, "uncached", 16)
    hit_first, hit_tokens = last_token_alone(fused, prompt, "cache_hit", 16)
    assert torch.equal(hit_first, first)
    assert hit_tokens == tokens
    # A chunked prefill already differs from one prefill in the last bits in the torch path (its
    # attention tiles the chunks' rows otherwise), as do longer tails after a partial hit (at most
    # DECODE_ROWS_MAX_TOKENS run as decode rows there): what holds is that the fused runner's 1-token
    # last chunk is the torch path's.
    chunk_first, _ = last_token_alone(fused, prompt, "chunk", 0)
    ref_first, _ = last_token_alone(ref, prompt, "chunk", 0)
    assert torch.equal(chunk_first, ref_first)
    tail_first, _ = last_token_alone(fused, prompt, "cache_hit", 0, tail=3)
    ref_first, _ = last_token_alone(ref, prompt, "cache_hit", 0, tail=3)
    assert torch.equal(tail_first, ref_first)


def test_profile_gives_the_forwards_bits_and_times_every_stage(runners):
    """DecodeModel.profile (scripts/bench_gguf_cpu.py --profile) runs the forward itself, timed by stage."""
    fused, _ = runners
    fast = fused.fast_decode
    calls = []

    class Recording:
        def __init__(self, model):
            self.model = model

        def forward(self, *args):
            calls.append(args)
            return self.model.forward(*args)

    kernel_model = fast._kernel_model
    fast._kernel_model = Recording(kernel_model)
    try:
        greedy(fused, PROMPTS[:1], 2)
    finally:
        fast._kernel_model = kernel_model
    args = calls[-1]  # the last decode step's inputs (its K/V rewritten with the same values below)
    hidden = kernel_model.forward(*args)
    profiled, times = kernel_model.profile(*args)
    assert torch.equal(profiled, hidden)
    stages = list(fast._module.STAGES)
    assert stages == ["norm", "qkv", "rope_store", "attention", "o", "gate_up", "silu_mul", "down"]
    # a bs1 step splits its stages over the threads: a row per thread, then the stage walls (thread 0's)
    threads = torch.get_num_threads()
    assert times.dtype == torch.float64 and times.shape == (threads + 1, len(stages))
    assert (times >= 0).all() and torch.equal(times[-1], times[0])
    for linear in ("qkv", "o", "gate_up", "down"):
        assert (times[:, stages.index(linear)] > 0).all()


def test_small_steps_split_stages_over_threads_with_the_same_bits(runners):
    """Steps of up to 4 tokens, and larger ones whose split by sequences would idle a thread, split every
    stage over the threads (cpu_decode.cpp, SpinBarrier): decode steps of 1 and 3 rows and verify steps of
    one sequence, 4 and 7 tokens (they read each other's K/V), give the one-thread forward's bits."""
    fused, _ = runners
    module = fused.fast_decode._module
    threads = torch.get_num_threads()
    was = module.set_split_stages(True)
    try:
        torch.set_num_threads(2)
        got = {}
        for split in (True, False):
            module.set_split_stages(split)
            got[split] = (
                greedy(fused, PROMPTS[:1], 3)[1],
                greedy(fused, PROMPTS, 3)[1],
                [verify_step_logits(fused, [3]), verify_step_logits(fused, [6])],
            )
    finally:
        module.set_split_stages(was)
        torch.set_num_threads(threads)
    for split_run, one_thread in zip(got[True], got[False]):
        assert len(split_run) == len(one_thread) > 0
        for a, b in zip(split_run, one_thread):
            assert torch.equal(a, b)


def verify_step_logits(runner, drafts):
    """Logits of one verify step of PROMPTS[i] with drafts[i] draft tokens each (after their prefill)."""
    runner.reset()
    free = iter(range(1, 1000))
    new = [
        NewRequest(f"r{i}", p, [next(free) for _ in p], sampling=GREEDY)
        for i, p in enumerate(PROMPTS[: len(drafts)])
    ]
    runner.step(StepInput(0, new_requests=new))
    cont = [
        ContinuingRequest(f"r{i}", [next(free) for _ in range(k + 1)], draft_ids=[42] * k)
        for i, k in enumerate(drafts)
    ]
    return runner.step(StepInput(1, continuing_requests=cont)).logits.float()


def test_threads_split_a_step_by_sequences_with_the_same_bits(runners):
    """Above 4 tokens each thread runs every stage on its own tokens (no barriers): the rows equal the
    one-thread step's bit for bit, and a verify step's tokens of one sequence (which read each other's
    K/V slots) stay on one thread (else the other thread's rows read slots not written yet)."""
    fused, _ = runners
    threads = torch.get_num_threads()
    try:
        got = {}
        for t in (1, 2):
            torch.set_num_threads(t)
            got[t] = (
                greedy(fused, PROMPTS * 5 + PROMPTS[:1], 3)[1],  # 16 decode rows
                verify_step_logits(fused, [2, 12]),  # rows 0..2 and 3..15: split at 3, not 8
                verify_step_logits(fused, [6, 3, 4]),  # split at 7
            )
    finally:
        torch.set_num_threads(threads)
    assert got[1][0][0].shape[0] == 16 and got[1][1].shape[0] == 16 and got[1][2].shape[0] == 16
    for a, b in zip(got[1][0], got[2][0]):
        assert torch.equal(a, b)
    assert torch.equal(got[1][1], got[2][1])
    assert torch.equal(got[1][2], got[2][2])


def test_the_startup_log_says_the_rows_are_packed(runners):
    from radixserve.executor.fast_decode import gguf_layout

    fused, _ = runners
    assert gguf_layout(fused.model) == "rows packed 16 at a time"
    down = fused.model.model.layers[0].mlp.down_proj.weight
    ((qtype, rows),) = down.gguf_parts
    down.gguf_parts = [
        (gguf_cpu.base_type(qtype), gguf_cpu.unpack_rows(rows, gguf_cpu.base_type(qtype)))
    ]
    try:
        assert gguf_layout(fused.model) == "rows partly packed"
    finally:
        down.gguf_parts = [(qtype, rows)]


def test_lm_head_runs_as_one_call_with_the_torch_paths_bits(runners, monkeypatch):
    """The fused steps' LM head (gguf_cpu.gguf_logits on the tied Q8_0 blocks) gives model.compute_logits'
    float32 logits bit for bit, and the runner's decode steps take it (not the torch LM head)."""
    fused, _ = runners
    fast = fused.fast_decode
    assert fast._lm_head is not None and fast._lm_head[1] == gguf_cpu.PACKED + gguf_cpu.Q8_0
    hidden = (torch.randn(5, 576, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    for rows in (1, 5):
        got = fast.compute_logits(hidden[:rows])
        want = fused.model.compute_logits(hidden[:rows])
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want)
    calls = []
    real = gguf_cpu.gguf_logits
    monkeypatch.setattr(gguf_cpu, "gguf_logits", lambda *a: calls.append(a[0].shape) or real(*a))
    greedy(fused, PROMPTS[:2], 3)
    assert calls == [(2, 576)] * 3  # the decode steps; the prefill keeps the torch path
