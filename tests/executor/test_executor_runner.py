"""ModelRunner step semantics, sampling, dummy weights, KV sizing and the gRPC servicer."""

import asyncio
import math

import grpc
import pytest
import torch

from radixserve.v1 import common_pb2, executor_pb2, executor_pb2_grpc
from radixserve.common.grpc_util import aio_channel
from radixserve.executor.kv_cache import CPU_MAX_KV_TOKENS, compute_kv_slots
from radixserve.executor.runner import ModelRunner
from radixserve.executor.sampling import _filter_probs, sample
from radixserve.common.step_order import StepOrder
from radixserve.common.step_session import ExecutorSession
from radixserve.executor.server import start_server
from radixserve.common.sampling import Constraint, SamplingParams, StoppingCriteria
from radixserve.common.step import ContinuingRequest, NewRequest, StepError, StepInput
from tests.executor.tiny_llama import VOCAB, new
from tests.configs import runner_config


# --- step diff semantics -------------------------------------------------------------------------


def test_state_is_cached_and_outputs_are_ordered(runner):
    out = runner.step(
        StepInput(1, new_requests=[new("a", [3, 4, 5], [1, 2, 3]), new("b", [6], [4])])
    )
    assert (
        [o.request_id for o in out.outputs] == ["a", "b"]
        and out.step_id == 1
        and out.forward_ms > 0
    )
    out = runner.step(
        StepInput(
            2,
            new_requests=[new("c", [7, 8], [5, 6], sample=False)],
            continuing_requests=[ContinuingRequest("b", [7]), ContinuingRequest("a", [8])],
        )
    )
    assert [o.request_id for o in out.outputs] == ["b", "a"]  # c did not sample
    row = runner.states["a"].table_row
    assert runner.states["a"].length == 4 and runner.slot_table.tensor[row, :4].tolist() == [
        1,
        2,
        3,
        8,
    ]
    assert runner.slot_table.next_tokens[row].item() == out.outputs[1].token_id


def test_decode_uses_last_sampled_token(runner):
    ids = [3, 4, 5]
    out = runner.step(StepInput(1, new_requests=[new("a", ids, [1, 2, 3])]))
    first = out.outputs[0].token_id
    out = runner.step(StepInput(2, continuing_requests=[ContinuingRequest("a", [4])]))
    explicit = out.logits[0]
    # The same sequence with the token given explicitly, as a fresh request, gives the same logits.
    out = runner.step(StepInput(3, new_requests=[new("z", ids + [first], [10, 11, 12, 13])]))
    torch.testing.assert_close(out.logits[0], explicit, atol=1e-5, rtol=0)


def test_a_reused_table_row_is_read_only_up_to_its_requests_length(runner):
    runner.step(StepInput(1, new_requests=[new("long", list(range(3, 11)), list(range(1, 9)))]))
    row = runner.states["long"].table_row
    # "long" finishes; its SlotTable row goes to "b", which is shorter, batched with the longer "c".
    out = runner.step(
        StepInput(
            2,
            finished_request_ids=["long"],
            new_requests=[
                new("b", [3, 4], [20, 21]),
                new("c", [5, 6, 7, 8, 9], [30, 31, 32, 33, 34]),
            ],
        )
    )
    assert runner.states["b"].table_row == row
    first = out.outputs[0].token_id
    out = runner.step(
        StepInput(
            3, continuing_requests=[ContinuingRequest("b", [22]), ContinuingRequest("c", [35])]
        )
    )
    assert runner.slot_table.tensor[row, :8].tolist() == [
        20,
        21,
        22,
        4,
        5,
        6,
        7,
        8,
    ]  # long's slots past b's 3
    decoded = out.logits[0]
    out = runner.step(StepInput(4, new_requests=[new("z", [3, 4, first], [40, 41, 42])]))
    torch.testing.assert_close(out.logits[0], decoded, atol=1e-5, rtol=0)


def test_fused_decode_gets_each_sequences_slots_from_its_table_row(runner):
    from radixserve.executor.fast_decode import FastDecode

    class Recorder:  # stands in for the C++ kernels (which need AVX512-BF16): records its inputs
        def forward(self, x, positions, out_slots, table, lens):
            self.args = (positions.tolist(), out_slots.tolist(), table.clone(), lens.tolist())
            return torch.zeros_like(x)

    recorder = Recorder()
    runner.fast_decode = FastDecode(None, recorder, runner.model)
    runner.step(StepInput(1, new_requests=[new("long", list(range(3, 11)), list(range(1, 9)))]))
    runner.step(
        StepInput(
            2,
            finished_request_ids=["long"],
            new_requests=[
                new("b", [3, 4], [20, 21]),
                new("c", [5, 6, 7], [30, 31, 32], prefix_slots=[9, 10]),
            ],
        )
    )
    runner.step(
        StepInput(
            3, continuing_requests=[ContinuingRequest("c", [33]), ContinuingRequest("b", [22])]
        )
    )
    positions, out_slots, table, lens = recorder.args
    assert positions == [5, 2] and out_slots == [33, 22] and lens == [6, 3]
    assert table.shape == (2, 6) and table.is_contiguous()
    assert table[0].tolist() == [9, 10, 30, 31, 32, 33] and table[1, :3].tolist() == [20, 21, 22]


def test_finished_ids_dropped_before_step_allows_retraction(runner):
    runner.step(StepInput(1, new_requests=[new("a", [3, 4], [1, 2])]))
    out = runner.step(
        StepInput(
            2,
            finished_request_ids=["a", "never-seen"],
            new_requests=[new("a", [3, 4, 9], [1, 2, 3])],
        )
    )
    assert runner.states["a"].length == 3 and out.outputs[0].request_id == "a"
    runner.step(StepInput(3, finished_request_ids=["a"]))
    assert "a" not in runner.states


@pytest.mark.parametrize(
    "bad_step, message",
    [
        (StepInput(1, continuing_requests=[ContinuingRequest("ghost", [5])]), "unknown"),
        (StepInput(1, new_requests=[new("x", [3, 4], [5])]), "new_slots"),
        (StepInput(1, new_requests=[new("x", [3], [201])]), "slot ids"),
        (StepInput(1, new_requests=[new("x", [3], [0])]), "slot ids"),
        (StepInput(1, new_requests=[new("x", [3], [7], prefix_slots=[999])]), "slot ids"),
        (StepInput(1, new_requests=[new("x", [VOCAB], [7])]), "token ids"),
        (StepInput(1, new_requests=[new("a", [3], [7])]), "already active"),
        (StepInput(1, continuing_requests=[ContinuingRequest("a", [7, 8])]), "new_slots"),
    ],
)
def test_invalid_steps_raise_and_leave_state_intact(runner, bad_step, message):
    runner.step(StepInput(0, new_requests=[new("a", [3, 4], [1, 2])]))
    with pytest.raises(StepError, match=message):
        runner.step(bad_step)
    assert set(runner.states) == {"a"} and runner.states["a"].length == 2
    out = runner.step(StepInput(2, continuing_requests=[ContinuingRequest("a", [3])]))
    assert out.outputs[0].request_id == "a"


def test_decode_without_sampled_token_is_an_error(runner):
    runner.step(StepInput(1, new_requests=[new("a", [3, 4], [1, 2], sample=False)]))
    with pytest.raises(StepError, match="no token sampled"):
        runner.step(StepInput(2, continuing_requests=[ContinuingRequest("a", [3])]))


def test_reset_drops_everything(runner):
    runner.step(StepInput(1, new_requests=[new("a", [3], [1]), new("b", [3], [2])]))
    assert runner.reset() == 2 and runner.states == {}


# --- sampling ------------------------------------------------------------------------------------


def logits_batch(rows=4, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_top_k_one_are_argmax():
    logits = logits_batch()
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=1, seed=3),
    ]
    res = sample(logits, params, [None, None, None, torch.Generator().manual_seed(3)])
    assert res.token_ids == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_batch_independent():
    logits = logits_batch(rows=3)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    other = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(42)
    alone = [sample(logits[[0]], [seeded], [gen]).token_ids[0] for _ in range(20)]
    gen = torch.Generator().manual_seed(42)
    batched = [
        sample(logits[[1, 0, 2]], [other, seeded, other], [None, gen, None]).token_ids[1]
        for _ in range(20)
    ]
    assert alone == batched
    assert len(set(alone)) > 1  # it does sample


def test_top_p_and_min_p_filter_a_known_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4)
    params = [
        SamplingParams(temperature=1, top_p=0.7),
        SamplingParams(temperature=1, top_p=0.85),
        SamplingParams(temperature=1, min_p=0.4),
        SamplingParams(temperature=1, top_k=3),
    ]
    kept = (_filter_probs(probs, params) > 0).tolist()
    assert kept == [
        [True, True, False, False],
        [True, True, True, False],
        [True, True, False, False],
        [True, True, True, False],
    ]
    logits = probs.log()
    seen = set()
    for seed in range(200):
        res = sample(logits[[2]], [params[2]], [torch.Generator().manual_seed(seed)])
        seen.add(res.token_ids[0])
    assert seen == {0, 1}


def test_logprobs():
    logits = logits_batch(rows=2)
    params = [SamplingParams(return_logprob=True, top_logprobs_num=5), SamplingParams()]
    res = sample(logits, params, [None, None])
    expected = torch.log_softmax(logits[0], -1)
    assert math.isclose(res.logprobs[0], expected[res.token_ids[0]].item(), rel_tol=1e-5)
    assert len(res.top_logprobs[0]) == 5 and res.top_logprobs[0][0][0] == res.token_ids[0]
    assert [lp for _, lp in res.top_logprobs[0]] == sorted(
        (lp for _, lp in res.top_logprobs[0]), reverse=True
    )
    assert res.logprobs[1] is None and res.top_logprobs[1] == []


def test_seeded_request_through_runner_is_reproducible(runner):
    sp = SamplingParams(temperature=1.0, top_k=20, seed=7)

    def generate(extra: bool):
        runner.reset()
        reqs = [new("s", [3, 4, 5], [1, 2, 3], sampling=sp)]
        if extra:
            reqs.append(new("t", [9, 9], [20, 21], sampling=SamplingParams(temperature=1.0)))
        toks = [runner.step(StepInput(1, new_requests=reqs)).outputs[0].token_id]
        for i in range(8):
            toks.append(
                runner.step(StepInput(i + 2, continuing_requests=[ContinuingRequest("s", [4 + i])]))
                .outputs[0]
                .token_id
            )
        return toks

    assert generate(False) == generate(True)


# --- loading and sizing --------------------------------------------------------------------------


def test_dummy_weights_are_finite_and_seeded(model_dir, runner):
    out = runner.step(StepInput(1, new_requests=[new("a", [3, 4, 5], [1, 2, 3])]))
    assert torch.isfinite(out.logits).all() and out.logits.abs().max() > 0
    again = ModelRunner(
        model_dir,
        runner_config(
            dtype="float32", device="cpu", load_format="dummy", random_seed=0, max_total_tokens=200
        ),
    )
    torch.testing.assert_close(
        again.step(StepInput(1, new_requests=[new("a", [3, 4, 5], [1, 2, 3])])).logits, out.logits
    )


def test_model_info_and_dtype_auto(model_dir, runner):
    info = runner.model_info()
    assert info.kv_slots == 201 and info.vocab_size == VOCAB and info.eos_token_ids == [2, 5]
    assert info.dtype == "float32" and info.device == "cpu" and info.context_length == 256
    assert info.architecture == "LlamaForCausalLM" and info.num_parameters > 0
    auto = ModelRunner(
        model_dir, runner_config(load_format="dummy", max_total_tokens=16, context_length=64)
    )
    assert auto.model_info().dtype == "bfloat16" and auto.model_info().context_length == 64
    out = auto.step(StepInput(1, new_requests=[new("a", [3, 4, 5], [1, 2, 3])]))
    assert torch.isfinite(out.logits).all()


def test_kv_slot_sizing():
    assert compute_kv_slots(1000, torch.device("cpu"), 100, None) == 101
    slots = compute_kv_slots(1000, torch.device("cpu"), None, None)
    assert 16 < slots <= CPU_MAX_KV_TOKENS + 1


# --- gRPC ----------------------------------------------------------------------------------------


def test_grpc_server_in_process(runner):
    async def scenario():
        server, port = await start_server(runner, "127.0.0.1:0")
        try:
            async with aio_channel(f"127.0.0.1:{port}") as channel:
                stub = executor_pb2_grpc.ExecutorStub(channel)
                info = await stub.GetModelInfo(executor_pb2.ExecutorModelInfoRequest())
                assert (
                    info.kv_slots == 201
                    and list(info.eos_token_ids) == [2, 5]
                    and info.dtype == "float32"
                    and info.kv_cache_dtype == "float32"
                    and info.kv_bytes_per_token
                    == 2 * 2 * 2 * 8 * 4  # K+V, 2 layers, 2 kv heads of 8
                )
                session = await ExecutorSession.open(stub)
                sid = session.id  # Step and Reset only from the executor's step session
                sampling = common_pb2.SamplingParams(
                    temperature=0.0, return_logprob=True, top_logprobs_num=3
                )
                resp = await stub.Step(
                    executor_pb2.ExecutorStepRequest(
                        step_id=7,
                        session_id=sid,
                        new_requests=[
                            executor_pb2.ExecutorNewRequest(
                                request_id="a",
                                input_ids=[3, 4],
                                new_slots=[1, 2],
                                sampling=sampling,
                                sample=True,
                            )
                        ],
                    )
                )
                assert (
                    resp.step_id == 7 and resp.outputs[0].request_id == "a" and resp.forward_ms > 0
                )
                assert len(resp.outputs[0].logprob.top) == 3
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Step(
                        executor_pb2.ExecutorStepRequest(
                            step_id=8,
                            session_id=sid,
                            continuing_requests=[
                                executor_pb2.ExecutorContinuingRequest(
                                    request_id="ghost", new_slots=[3], sample=True
                                )
                            ],
                        )
                    )
                assert (
                    err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    and "ghost" in err.value.details()
                )
                resp = await stub.Step(
                    executor_pb2.ExecutorStepRequest(
                        step_id=9,
                        session_id=sid,
                        continuing_requests=[
                            executor_pb2.ExecutorContinuingRequest(
                                request_id="a", new_slots=[3], sample=True
                            )
                        ],
                    )
                )
                assert resp.outputs[0].request_id == "a"
                reset = await stub.Reset(executor_pb2.ExecutorResetRequest(session_id=sid))
                assert reset.dropped == 1
                session.close()
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_grpc_steps_run_in_step_id_order(runner):
    async def scenario():
        server, port = await start_server(runner, "127.0.0.1:0")
        try:
            async with aio_channel(f"127.0.0.1:{port}") as channel:
                stub = executor_pb2_grpc.ExecutorStub(channel)
                session = await ExecutorSession.open(stub)
                sid = session.id  # Step and Reset only from the executor's step session
                greedy = common_pb2.SamplingParams(temperature=0.0)
                first = await stub.Step(
                    executor_pb2.ExecutorStepRequest(
                        step_id=1,
                        session_id=sid,
                        new_requests=[
                            executor_pb2.ExecutorNewRequest(
                                request_id="a",
                                input_ids=[3, 4, 5],
                                new_slots=[1, 2, 3],
                                sampling=greedy,
                                sample=True,
                            )
                        ],
                    )
                )

                def decode(step_id, slot):
                    return stub.Step(
                        executor_pb2.ExecutorStepRequest(
                            step_id=step_id,
                            session_id=sid,
                            continuing_requests=[
                                executor_pb2.ExecutorContinuingRequest(
                                    request_id="a", new_slots=[slot], sample=True
                                )
                            ],
                        )
                    )

                later = decode(3, 11)
                await asyncio.sleep(0.1)  # step 3 arrives first and must wait for step 2
                second, third = await asyncio.gather(decode(2, 10), later)
                row = runner.states["a"].table_row
                assert runner.slot_table.tensor[row, :5].tolist() == [1, 2, 3, 10, 11]
                assert runner.slot_table.next_tokens[row].item() == third.outputs[0].token_id
                # Step 2 decoded the token step 1 sampled: a fresh request with it spelled out agrees.
                tokens = [3, 4, 5, first.outputs[0].token_id]
                check = await stub.Step(
                    executor_pb2.ExecutorStepRequest(
                        step_id=4,
                        session_id=sid,
                        new_requests=[
                            executor_pb2.ExecutorNewRequest(
                                request_id="z",
                                input_ids=tokens,
                                new_slots=[20, 21, 22, 23],
                                sampling=greedy,
                                sample=True,
                            )
                        ],
                    )
                )
                assert check.outputs[0].token_id == second.outputs[0].token_id
                session.close()
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_step_order_gap_times_out_and_reset_rebases():
    async def scenario():
        order = StepOrder(timeout_s=0.1)
        await order.wait_turn(5)
        await order.done(5)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await order.wait_turn(7)  # step 6 never comes
        assert 0.09 < loop.time() - start < 1.0
        await order.done(7)
        await order.reset()
        start = loop.time()
        await order.wait_turn(1)
        assert loop.time() - start < 0.05 and order.next_id == 1

    asyncio.run(scenario())


def test_seeded_request_gives_the_same_tokens_after_retraction(runner):
    sampling = SamplingParams(temperature=1.0, seed=1234)
    prompt = [3, 4, 5, 6]

    def decode(rid, first_slot, steps, step_id):
        tokens = []
        for i in range(steps):
            out = runner.step(
                StepInput(
                    step_id + i, continuing_requests=[ContinuingRequest(rid, [first_slot + i])]
                )
            )
            tokens.append(out.outputs[0].token_id)
        return tokens

    first = runner.step(
        StepInput(1, new_requests=[new("s", prompt, [1, 2, 3, 4], sampling=sampling)])
    )
    straight = [first.outputs[0].token_id] + decode("s", 5, 7, 2)

    # Same request, retracted after 4 tokens: state dropped, re-added with prompt + generated as its
    # input (KV recomputed at other slots), then decoded on; a second request shares the batch.
    first = runner.step(
        StepInput(
            20,
            finished_request_ids=["s"],
            new_requests=[new("s", prompt, [31, 32, 33, 34], sampling=sampling)],
        )
    )
    before = [first.outputs[0].token_id] + decode("s", 35, 3, 21)
    again = runner.step(
        StepInput(
            30,
            finished_request_ids=["s"],
            new_requests=[
                new("s", prompt + before, list(range(60, 68)), sampling=sampling),
                new("other", [9, 9], [70, 71], sampling=SamplingParams(temperature=1.0, seed=7)),
            ],
        )
    )
    after = [again.outputs[0].token_id] + decode("s", 80, 3, 31)
    assert before + after == straight


def test_step_protobuf_round_trip():
    from radixserve.common.step_convert import step_from_proto, step_to_proto

    step = StepInput(
        7,
        finished_request_ids=["old"],
        new_requests=[
            NewRequest(
                "a",
                [3, 4],
                [5, 6],
                prefix_slots=[1, 2],
                sample=False,
                sampling=SamplingParams(
                    temperature=0.5,
                    top_p=0.75,
                    top_k=4,
                    min_p=0.125,
                    seed=11,
                    return_logprob=True,
                    top_logprobs_num=2,
                    frequency_penalty=0.5,
                    presence_penalty=-0.25,
                    repetition_penalty=1.25,
                    logit_bias={3: -100.0, 17: 2.5},
                    constraint=Constraint("regex", "[0-9]+"),
                ),
                token_bitmask=b"\x01\x00\x00\x00",
                penalty_prompt_ids=[7, 3],
                stopping=StoppingCriteria(
                    max_new_tokens=8, stop_token_ids=(9,), ignore_eos=True, min_new_tokens=4
                ),
                generated_tokens=3,
                trace_context=common_pb2.TraceContext(traceparent="00-ab-cd-01"),
            ),
            NewRequest("b", [9], [8]),
        ],
        continuing_requests=[
            ContinuingRequest("c", [10], token_bitmask=b"\xff\x00\x00\x00"),
            ContinuingRequest("d", [12, 13], [1, 2]),
        ],
    )
    assert step_from_proto(step_to_proto(step)) == step


def test_step_int_tensors_start_16_byte_aligned_whatever_the_list_sizes(runner):
    """Triton specializes kernels on each pointer's 16-byte alignment: the step's packed int lists must
    not shift it with their sizes, or live traffic compiles kernel variants the warm-up never saw."""
    built = []
    build = runner.batch_builder.build
    runner.batch_builder.build = lambda step, states: built.append(build(step, states)) or built[-1]
    runner.step(StepInput(1, new_requests=[new("a", [3, 4, 5], [1, 2, 3])]))
    runner.step(
        StepInput(
            2,
            new_requests=[
                new("b", [6], [10]),
                new("c", [7, 8, 9, 10, 11], [20, 21, 22, 23, 24]),
                new("d", [12, 13], [30, 31]),
            ],
            continuing_requests=[ContinuingRequest("a", [4])],
        )
    )
    batch = built[-1]
    meta = batch.table_meta
    # b, c and d extend (a prompt's one token too: prompt tokens run as their prefill); a decodes.
    assert meta.num_extends == 3 and batch.decode_lens == [4]
    assert batch.num_tokens == 9  # odd-sized lists: the tokens, the three extends
    tensors = {
        "input_ids": batch.input_ids,
        "positions": batch.positions,
        "out_slots": batch.out_slots,
        "seq_rows": meta.seq_rows,
        "seq_lens": meta.seq_lens,
        "extend_prefix_lens": meta.extend_prefix_lens,
        "extend_q_starts": meta.extend_q_starts,
        "extend_q_lens": meta.extend_q_lens,
        "sample_index": batch.samples.token_index,
        "sample_rows": batch.samples.rows,
    }
    misaligned = {name: t.data_ptr() % 16 for name, t in tensors.items() if t.data_ptr() % 16}
    assert misaligned == {}
