"""Launch-ahead: step N+1 launched before step N is collected (as the executor server does when the
scheduler overlaps) gives the same tokens as running the steps one by one, with the decode inputs
taken from the device (triton backend: the slot table's next_tokens) or from the host (torch_native)."""

import asyncio
import json
import os
import threading

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from radixserve.v1 import executor_pb2_grpc
from radixserve.common.grpc_util import aio_channel
from radixserve.executor.runner import ModelRunner
from tests.configs import runner_config
from radixserve.common.step_session import ExecutorSession
from radixserve.common.step_convert import step_to_proto
from radixserve.executor.server import start_server
from radixserve.common.sampling import SamplingParams
from radixserve.common.step import ContinuingRequest, NewRequest, StepError, StepInput

VOCAB = 96
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "eos_token_id": 2,
}
DECODE_STEPS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def make_runner(model_dir, backend):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return ModelRunner(
        model_dir,
        runner_config(
            dtype="float32",
            device=device,
            load_format="dummy",
            random_seed=0,
            max_total_tokens=400,
            attention_backend=backend,
        ),
    )


def steps():
    """Three requests: greedy, seeded sampling with a frequency penalty, and one that joins later with
    an explicit (chunk-style) input for one step; one finishes midway."""
    penalised = SamplingParams(
        temperature=0.9, seed=7, frequency_penalty=1.5, return_logprob=True, top_logprobs_num=2
    )
    out = [
        StepInput(
            1,
            new_requests=[
                NewRequest("a", [5, 9, 11], [1, 2, 3]),
                NewRequest("b", [7, 3], [20, 21], sampling=penalised),
            ],
        )
    ]
    slot = {"a": 4, "b": 22, "c": 42}
    for i in range(DECODE_STEPS):
        step = StepInput(2 + i)
        live = (["a"] if i < 4 else []) + ["b"] + (["c"] if i >= 2 else [])
        if i == 4:
            step.finished_request_ids = ["a"]
        for rid in live:
            if rid == "c" and i == 2:
                step.new_requests.append(NewRequest("c", [4, 4, 8], [40, 41, 42], sample=False))
                continue
            if rid == "c" and i == 3:
                step.continuing_requests.append(
                    ContinuingRequest("c", [slot["c"] + 1], input_ids=[13])
                )
                slot["c"] += 1
                continue
            slot[rid] += 1
            step.continuing_requests.append(ContinuingRequest(rid, [slot[rid]]))
        out.append(step)
    return out


def tokens_of(outputs):
    return [
        [(o.request_id, o.token_id, o.logprob, o.top_logprobs) for o in out.outputs]
        for out in outputs
    ]


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_launch_ahead_equals_one_by_one(model_dir, backend):
    one_by_one = make_runner(model_dir, backend)
    expected = [one_by_one.step(s) for s in steps()]

    ahead = make_runner(model_dir, backend)
    got, previous = [], None
    for s in steps():
        launched = ahead.launch(s)  # before the previous step is collected
        if previous is not None:
            got.append(ahead.collect(previous))
        previous = launched
    got.append(ahead.collect(previous))

    assert [o.step_id for o in got] == [s.step_id for s in steps()]
    assert tokens_of(got) == tokens_of(expected)
    # a: prefill + 4 decodes; b: prefill + 6; c: from its explicit-input step on, 3
    assert sum(len(o.outputs) for o in got) == 5 + 7 + 3
    # the penalised seeded request really sampled (not greedy), and its logprobs came back
    assert all(
        o.logprob is not None and len(o.top_logprobs) == 2
        for out in got
        for o in out.outputs
        if o.request_id == "b"
    )


def test_decode_after_a_non_sampling_chunk_needs_explicit_input(model_dir):
    runner = make_runner(model_dir, "triton")
    runner.step(StepInput(1, new_requests=[NewRequest("a", [5, 9], [1, 2])]))
    runner.step(
        StepInput(2, continuing_requests=[ContinuingRequest("a", [3], input_ids=[4], sample=False)])
    )
    with pytest.raises(StepError, match="no token sampled"):
        runner.launch(StepInput(3, continuing_requests=[ContinuingRequest("a", [4])]))


class RecordingRunner:
    """A ModelRunner that logs launch/collect calls; collecting step 1 waits (up to 5 s) for step 2 to
    be launched, which only a server that launches while it collects lets happen in time. It says it
    launches ahead (as a CUDA runner does) also when the test runs on the CPU, whose runner the server
    collects on the worker instead (tests/executor/test_executor_step_threads.py)."""

    launches_ahead = True

    def __init__(self, runner):
        self.runner, self.calls = runner, []
        self.step_2_launched = threading.Event()

    def launch(self, step):
        self.calls.append(("launch", step.step_id))
        if step.step_id == 2:
            self.step_2_launched.set()
        return self.runner.launch(step)

    def collect(self, launched):
        if launched.step_id == 1:
            self.calls.append(
                ("step 2 launched while step 1 was collected", self.step_2_launched.wait(5))
            )
        self.calls.append(("collect", launched.step_id))
        return self.runner.collect(launched)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def test_server_launches_an_early_step_before_collecting_the_previous_one(model_dir):
    runner = RecordingRunner(make_runner(model_dir, "triton"))
    reference = make_runner(model_dir, "triton")
    expected = [reference.step(s) for s in steps()[:3]]

    async def scenario():
        server, port = await start_server(runner, "127.0.0.1:0")
        try:
            async with aio_channel(f"127.0.0.1:{port}") as channel:
                stub = executor_pb2_grpc.ExecutorStub(channel)
                session = await ExecutorSession.open(
                    stub
                )  # Step only from the executor's step session

                def step(i):
                    msg = step_to_proto(steps()[i])
                    msg.session_id = session.id
                    return stub.Step(msg)

                first = step(0)
                await asyncio.sleep(0.1)
                second = step(1)
                results = await asyncio.gather(first, second)
                results.append(await step(2))
                session.close()
                return results
        finally:
            await server.stop(None)

    results = asyncio.run(scenario())
    assert runner.calls[:5] == [
        ("launch", 1),
        ("launch", 2),
        ("step 2 launched while step 1 was collected", True),
        ("collect", 1),
        ("collect", 2),
    ]
    assert [[(o.request_id, o.token_id) for o in r.outputs] for r in results] == [
        [(o.request_id, o.token_id) for o in e.outputs] for e in expected
    ]
