"""--enable-torch-compile on the CPU (inductor): the warm-up compiles the decode forward for every batch
size up to --torch-compile-max-bs, the traffic after it compiles nothing, and the compiled steps give
the eager runner's greedy tokens and logits (float32, within 1e-4). One compiled runner for the file.
On a GPU (`-m cuda`): the compiled forward captured in CUDA graphs against the eager graphs."""

import pytest
import torch
import torch._dynamo

from radixserve.common.step import ContinuingRequest, NewRequest, StepInput
from radixserve.executor.runner import ModelRunner
from radixserve.executor.torch_compile import graphs_compiled
from radixserve.executor.warmup import Warmup, run_warmup
from tests.configs import runner_config
from tests.executor.warmup_harness import server_args

MAX_BS = 4
LOGITS_TOL = dict(atol=1e-4, rtol=1e-4)  # float32; inductor reorders reductions


def cpu_runner(model_dir, **compile_flags) -> ModelRunner:
    return ModelRunner(
        model_dir,
        runner_config(
            dtype="float32",
            device="cpu",
            load_format="dummy",
            random_seed=0,
            max_total_tokens=400,
            **compile_flags,
        ),
    )


@pytest.fixture(scope="module")
def compiled(model_dir):
    runner = cpu_runner(model_dir, enable_torch_compile=True, torch_compile_max_bs=MAX_BS)
    report = run_warmup(runner, server_args())
    assert report.failed == [] and report.skipped == []
    return runner


@pytest.fixture(scope="module")
def eager(model_dir):
    return cpu_runner(model_dir)


class CallCounter:
    """Counts the calls of the runner's compiled forward."""

    def __init__(self, runner: ModelRunner):
        self.calls, self._inner = 0, runner.compiled_decode._compiled
        runner.compiled_decode._compiled = self

    def __call__(self, *args):
        self.calls += 1
        return self._inner(*args)


def traffic(runner: ModelRunner) -> tuple[list[int], list[torch.Tensor]]:
    """Prompts of several lengths, then decode steps of 5 (above the compiled sizes), 4, 3, 1 and 2
    requests; the greedy tokens and the logits of every step."""
    runner.reset()
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [13], [14, 15, 16, 17]]
    slot, new = 1, []
    for i, ids in enumerate(prompts):
        new.append(NewRequest(f"r{i}", ids, list(range(slot, slot + len(ids)))))
        slot += len(ids)
    tokens, logits = [], []

    def run(step: StepInput):
        out = runner.step(step)
        tokens.extend(o.token_id for o in out.outputs)
        logits.append(out.logits)

    run(StepInput(1, new_requests=new))
    for step_id, batch in enumerate([5, 4, 3, 1, 2, 4, 1], start=2):
        cont = [ContinuingRequest(f"r{i}", [slot + i]) for i in range(batch)]
        slot += batch
        run(StepInput(step_id, continuing_requests=cont))
    runner.step(StepInput(99, finished_request_ids=[f"r{i}" for i in range(len(prompts))]))
    return tokens, logits


def test_warmup_compiles_every_decode_size(compiled):
    cd = compiled.compiled_decode
    assert cd is not None and not cd.static_shapes and cd.max_bs == MAX_BS
    # Size 1 is its own graph; the dynamic batch dimension covers the others.
    assert cd.graphs >= 2 and cd.compile_seconds > 0 and 1 in cd.compiled_sizes
    assert f"covering 1..{MAX_BS}" in cd.describe()
    assert compiled.states == {}


def test_compiled_decode_matches_eager_and_compiles_nothing_on_traffic(compiled, eager):
    counter = CallCounter(compiled)
    try:
        before = graphs_compiled()
        with torch.compiler.set_stance("fail_on_recompile"):
            got_tokens, got_logits = traffic(compiled)
        assert graphs_compiled() == before
        assert counter.calls == 6  # every decode step but the one of 5 requests
    finally:
        compiled.compiled_decode._compiled = counter._inner
    want_tokens, want_logits = traffic(eager)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, **LOGITS_TOL)


def test_compile_flags_are_off_by_default(eager):
    assert eager.compiled_decode is None


def test_every_attention_layer_has_a_compiled_op_key(compiled):
    from radixserve.executor import compiled_ops

    keys = [layer.self_attn.attn.compiled_key for layer in compiled.model.model.layers]
    assert len(set(keys)) == len(keys)
    assert all(
        compiled_ops._layers[k] is compiled.model.model.layers[i].self_attn.attn
        for i, k in enumerate(keys)
    )


class RecordingRunner:
    def __init__(self):
        self.steps: list[StepInput] = []

    def step(self, step: StepInput):
        self.steps.append(step)

    def reset(self):
        pass


def test_warmup_runs_a_decode_step_of_every_compiled_size_in_few_slots():
    runner = RecordingRunner()
    warmup = Warmup(
        runner,
        kv_slots=17,  # slot 0 and 2 * 8 others suffice
        vocab_size=128,
        max_prefill_tokens=64,
        chunked_prefill_size=-1,
        max_running_requests=8,
        graph_max_bs=0,
        on_gpu=False,
        compiled_max_bs=32,  # clamped to the 8 requests that can run
    )
    names = [name for name, _ in warmup.plan()]
    assert names == ["prefill 1x7 + decode", "compiled decode of 1..8"]
    report = warmup.run()
    assert report.skipped == [] and report.failed == []
    compiled_steps = runner.steps[4:]  # after the small prefill + 2 decodes + finish
    decode_sizes = [len(s.continuing_requests) for s in compiled_steps if s.continuing_requests]
    assert decode_sizes == [8, 7, 6, 5, 4, 3, 2, 1]
    used = {
        slot
        for s in compiled_steps
        for r in (*s.new_requests, *s.continuing_requests)
        for slot in r.new_slots
    }
    assert max(used) <= 16
    assert compiled_steps[-1].finished_request_ids and not compiled_steps[-1].continuing_requests


@pytest.mark.cuda
def test_compiled_graphs_match_eager_graphs_on_cuda(tmp_path):
    import transformers

    from tests.executor.hf_parity import build_hf_model

    build_hf_model(
        transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        ),
        tmp_path,
    )

    def build(**flags):
        config = runner_config(
            dtype="bfloat16", device="cuda", max_total_tokens=4096, cuda_graph_max_bs=16, **flags
        )
        return ModelRunner(tmp_path, config)

    compiled = build(enable_torch_compile=True, torch_compile_max_bs=8)
    # Captured largest first: 8 compiles the dynamic graph that 4 and 2 reuse, 1 has its own.
    assert sorted(compiled.compiled_decode.compiled_sizes) == [1, 8]
    before = graphs_compiled()
    with torch.compiler.set_stance("fail_on_recompile"):
        got_tokens, got_logits = traffic(compiled)
    assert graphs_compiled() == before
    want_tokens, want_logits = traffic(build())
    # bf16, fused differently: each step's logits within 2% of the step's largest |logit|, and the
    # same greedy tokens until a near-tie (eager's two candidates within that tolerance) breaks the
    # other way; after that the inputs differ, so the comparison ends there.
    compared = 0
    for got, want in zip(got_logits, want_logits, strict=True):
        tolerance = 2e-2 * want.abs().max().item()
        assert (got - want).abs().max().item() <= tolerance
        rows = got.shape[0]
        pairs = zip(got_tokens[compared : compared + rows], want_tokens[compared : compared + rows])
        split = [(row, g, w) for row, (g, w) in enumerate(pairs) if g != w]
        for row, g, w in split:
            gap = (want[row, w] - want[row, g]).item()
            assert 0 <= gap <= tolerance, (row, g, w, gap)
        if split:
            break
        compared += rows
    assert compared >= 10  # the prefill and the first decode steps agree token for token
