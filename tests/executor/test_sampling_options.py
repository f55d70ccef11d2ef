"""Penalties, logit_bias, min_new_tokens and the allowed-token bitmask: executor, scheduler and gateway."""

import numpy as np
import pytest
import torch

from radixserve.v1 import common_pb2, gateway_pb2
from radixserve.executor.logits_processors import apply_bitmask_, apply_penalties, bitmask_words
from radixserve.common.sampling import SamplingParams, StoppingCriteria
from radixserve.common.step import ContinuingRequest, NewRequest, StepError, StepInput
from radixserve.common.step_convert import step_from_proto, step_to_proto
from radixserve.gateway.api.errors import ApiError
from radixserve.common.args import ServerArgs
from radixserve.gateway.api.grpc_api import generation_input
from radixserve.gateway.api.media import MediaLimits
from radixserve.gateway.api.native_routes import native_input
from radixserve.gateway.api.openai_routes import chat_input, completion_input
from radixserve.gateway.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NativeGenerateRequest,
)
from radixserve.gateway.pipeline.sampling import build_sampling
from radixserve.scheduler.request import FinishReason
from tests.executor.tiny_llama import VOCAB, new
from tests.scheduler.harness import Harness, prompts, reference_tokens

EOS = 2  # the tiny model's generation config has eos_token_id [2, 5]


def random_logits(rows, vocab=VOCAB, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def bitmask(allowed: list[int], words: int = -(-VOCAB // 32)) -> bytes:
    mask = np.zeros(words, dtype="<u4")
    for token in allowed:
        mask[token // 32] |= np.uint32(1 << (token % 32))
    return mask.tobytes()


def generate(runner, sampling, prompt, steps, rid="r", first_step=1, slot=1, **kw) -> list[int]:
    """Greedy/seeded tokens of one request: a prefill, then steps - 1 decodes."""
    out = runner.step(
        StepInput(
            first_step,
            new_requests=[
                new(rid, prompt, list(range(slot, slot + len(prompt))), sampling=sampling, **kw)
            ],
        )
    )
    tokens = [out.outputs[0].token_id]
    slot += len(prompt)
    for i in range(steps - 1):
        out = runner.step(
            StepInput(first_step + 1 + i, continuing_requests=[ContinuingRequest(rid, [slot + i])])
        )
        tokens.append(out.outputs[0].token_id)
    return tokens


# --- the logits transforms against straightforward references ----------------------------------


def reference_penalties(row, prompt, generated, frequency, presence, repetition):
    out = row.clone()
    for t in set(prompt) | set(generated):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(generated):
        out[t] -= frequency * generated.count(t) + presence
    return out


def penalise(logits, prompts_, generated, frequency, presence, repetition):
    counts = torch.zeros_like(logits)
    in_prompt = torch.zeros_like(logits, dtype=torch.bool)
    for r, (p, g) in enumerate(zip(prompts_, generated)):
        in_prompt[r, p] = True
        for t in g:
            counts[r, t] += 1
    return apply_penalties(
        logits, counts, in_prompt, *(torch.tensor(v) for v in (frequency, presence, repetition))
    )


def test_frequency_and_presence_penalties_follow_the_openai_formula():
    logits = random_logits(3)
    generated = [[4, 4, 4, 9], [], [7, 8, 7]]
    frequency, presence = [0.5, 1.0, -1.5], [0.25, 2.0, 1.0]
    got = penalise(logits, [[], [], []], generated, frequency, presence, [1.0] * 3)
    for r in range(3):
        torch.testing.assert_close(
            got[r], reference_penalties(logits[r], [], generated[r], frequency[r], presence[r], 1.0)
        )
    assert torch.equal(got[1], logits[1])  # nothing generated yet: untouched


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = random_logits(2)
    prompt, generated = [[3, 10, 11], [20, 21]], [[10, 40, 40], [50]]
    penalties = [1.3, 0.8]
    got = penalise(logits, prompt, generated, [0.0, 0.0], [0.0, 0.0], penalties)
    for r in range(2):
        hf = RepetitionPenaltyLogitsProcessor(penalties[r])(
            torch.tensor([prompt[r] + generated[r]]), logits[r : r + 1].clone()
        )
        assert torch.equal(got[r], hf[0])


def test_bitmask_layout_and_a_mask_shorter_than_the_logits():
    logits = random_logits(2)
    apply_bitmask_(logits, bitmask_words([bitmask([0, 33, 127]), bitmask([5], words=1)], VOCAB))
    assert torch.isfinite(logits).nonzero()[:, 1].tolist() == [0, 33, 127, 5]
    too_long = bitmask([1, 200], words=8)  # bits beyond the logits width are ignored
    assert bitmask_words([too_long], VOCAB).shape == (1, VOCAB // 32)


def test_bitmask_agrees_with_xgrammar():
    import xgrammar

    words = torch.randint(
        -(2**31),
        2**31 - 1,
        (3, VOCAB // 32),
        generator=torch.Generator().manual_seed(1),
        dtype=torch.int32,
    )
    ours, theirs = random_logits(3), random_logits(3)
    apply_bitmask_(ours, words)
    xgrammar.apply_token_bitmask_inplace(theirs, words)
    assert torch.equal(ours, theirs)


# --- through the ModelRunner -----------------------------------------------------------------------


def test_logit_bias_forces_and_forbids_tokens(runner):
    plain = generate(runner, SamplingParams(), [3, 4, 5], 4)
    runner.reset()
    assert generate(runner, SamplingParams(logit_bias={77: 100.0}), [3, 4, 5], 4) == [77] * 4
    runner.reset()
    forbidden = generate(runner, SamplingParams(logit_bias={plain[0]: -100.0}), [3, 4, 5], 1)
    assert forbidden[0] != plain[0]


def test_min_new_tokens_holds_back_eos_and_stop_ids(runner):
    forced_eos = SamplingParams(logit_bias={EOS: 100.0})
    tokens = generate(runner, forced_eos, [3, 4, 5], 5, stopping=StoppingCriteria(min_new_tokens=3))
    assert EOS not in tokens[:3] and 5 not in tokens[:3] and tokens[3:] == [EOS, EOS]
    runner.reset()
    # With ignore_eos only the stop ids are held back; EOS may come any time.
    stop = SamplingParams(logit_bias={EOS: 50.0, 7: 100.0})
    assert generate(
        runner,
        stop,
        [3, 4, 5],
        4,
        stopping=StoppingCriteria(min_new_tokens=2, stop_token_ids=(7,), ignore_eos=True),
    ) == [EOS, EOS, 7, 7]


def test_min_new_tokens_counts_tokens_generated_before_a_retraction(runner):
    forced_eos = SamplingParams(logit_bias={EOS: 100.0})
    # Re-sent after a retraction with 2 of its 3 held-back tokens already generated: one more is held back.
    tokens = generate(
        runner,
        forced_eos,
        [3, 4, 5, 9, 9],
        3,
        stopping=StoppingCriteria(min_new_tokens=3),
        generated_tokens=2,
    )
    assert tokens[0] not in (EOS, 5) and tokens[1:] == [EOS, EOS]
    runner.reset()
    assert generate(
        runner,
        forced_eos,
        [3, 4, 5, 9, 9, 9],
        2,
        stopping=StoppingCriteria(min_new_tokens=3),
        generated_tokens=3,
    ) == [EOS, EOS]


def test_bitmask_forces_the_one_allowed_token(runner):
    out = runner.step(
        StepInput(
            1,
            new_requests=[
                new("a", [3, 4], [1, 2], token_bitmask=bitmask([42])),
                new("b", [3, 4], [3, 4]),
            ],
        )
    )
    assert out.outputs[0].token_id == 42 and out.outputs[1].token_id != 42
    out = runner.step(
        StepInput(
            2,
            continuing_requests=[
                ContinuingRequest("a", [5], token_bitmask=bitmask([9], words=1)),
                ContinuingRequest("b", [6]),
            ],
        )
    )
    assert out.outputs[0].token_id == 9
    assert torch.isinf(out.logits[0]).sum() == VOCAB - 1 and torch.isfinite(out.logits[1]).all()


def test_bitmask_of_partial_words_is_a_step_error(runner):
    with pytest.raises(StepError, match="token_bitmask"):
        runner.step(
            StepInput(1, new_requests=[new("a", [3, 4], [1, 2], token_bitmask=b"\x01\x00")])
        )
    assert runner.states == {}


def test_penalties_through_the_runner_see_cached_prompt_and_generated_tokens(runner):
    sampling = SamplingParams(frequency_penalty=0.7, presence_penalty=0.4, repetition_penalty=1.5)
    prompt = [10, 11, 12, 13, 14]
    runner.step(StepInput(1, new_requests=[new("warm", prompt[:3], [1, 2, 3], sample=False)]))
    # "pen" and "ref" read the same cached prefix; ref is fed pen's tokens, so its logits are pen's unprocessed.
    out = runner.step(
        StepInput(
            2,
            new_requests=[
                new(
                    "pen",
                    prompt[3:],
                    [4, 5],
                    prefix_slots=[1, 2, 3],
                    sampling=sampling,
                    penalty_prompt_ids=prompt,
                ),
                new("ref", prompt[3:], [6, 7], prefix_slots=[1, 2, 3]),
            ],
        )
    )
    generated = []
    for i in range(6):
        expected = reference_penalties(out.logits[1], prompt, generated, 0.7, 0.4, 1.5)
        torch.testing.assert_close(out.logits[0], expected, atol=1e-5, rtol=1e-5)
        token = out.outputs[0].token_id
        assert token == out.logits[0].argmax().item()
        generated.append(token)
        out = runner.step(
            StepInput(
                3 + i,
                continuing_requests=[
                    ContinuingRequest("pen", [20 + i]),
                    ContinuingRequest("ref", [40 + i], input_ids=[token]),
                ],
            )
        )
    runner.step(StepInput(20, finished_request_ids=["pen", "ref", "warm"]))
    assert (
        runner.logits_processor.num_active == 0 and len(runner.logits_processor.penalties.free) == 8
    )


def test_plain_rows_are_bit_identical_next_to_rows_with_options(runner):
    options = [
        SamplingParams(frequency_penalty=1.0, repetition_penalty=1.2, logit_bias={3: 5.0}),
        SamplingParams(temperature=1.0, seed=5, logit_bias={EOS: 10.0}),
    ]
    holding_stops = [StoppingCriteria()] * 3 + [StoppingCriteria(min_new_tokens=2)]
    plain = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=3)]

    def run(with_options: bool):
        runner.reset()
        params = plain + (
            options if with_options else [SamplingParams(), SamplingParams(temperature=1.0, seed=5)]
        )
        masks = [b"", b"", b"", bitmask(range(0, VOCAB, 2))] if with_options else [b""] * 4
        stops = holding_stops if with_options else [StoppingCriteria()] * 4
        reqs = [
            new(
                f"r{i}",
                [3 + i, 4, 5],
                [1 + 3 * i, 2 + 3 * i, 3 + 3 * i],
                sampling=p,
                token_bitmask=m,
                stopping=stop,
            )
            for i, (p, m, stop) in enumerate(zip(params, masks, stops))
        ]
        outs = [runner.step(StepInput(1, new_requests=reqs))]
        for step in range(4):
            outs.append(
                runner.step(
                    StepInput(
                        2 + step,
                        continuing_requests=[
                            ContinuingRequest(f"r{i}", [20 + 4 * step + i]) for i in range(4)
                        ],
                    )
                )
            )
        return outs

    alone, mixed = run(False), run(True)
    for a, m in zip(alone, mixed):
        assert torch.equal(a.logits[:2], m.logits[:2])
        assert [o.token_id for o in a.outputs[:2]] == [o.token_id for o in m.outputs[:2]]
    assert any(not torch.equal(a.logits[2:], m.logits[2:]) for a, m in zip(alone, mixed))
    assert all(o.outputs[3].token_id % 2 == 0 for o in mixed)


def test_seeded_sampling_with_options_is_deterministic(runner):
    sampling = SamplingParams(
        temperature=1.0,
        seed=99,
        frequency_penalty=1.5,
        logit_bias={8: 2.0},
        return_logprob=True,
        top_logprobs_num=2,
    )
    first = generate(runner, sampling, [3, 4, 5], 6)
    runner.reset()
    runner.step(
        StepInput(
            1,
            new_requests=[
                new("other", [9, 9], [100, 101], sampling=SamplingParams(temperature=1.0))
            ],
        )
    )
    assert generate(runner, sampling, [3, 4, 5], 6, first_step=2) == first


def test_forbidden_tokens_report_a_finite_logprob(runner):
    sampling = SamplingParams(return_logprob=True, top_logprobs_num=3)
    out = runner.step(
        StepInput(
            1, new_requests=[new("a", [3], [1], sampling=sampling, token_bitmask=bitmask([6]))]
        )
    )
    result = out.outputs[0]
    assert result.token_id == 6 and abs(result.logprob) < 1e-6
    assert [lp for _, lp in result.top_logprobs[1:]] == [-9999.0, -9999.0]


def test_unset_repetition_penalty_in_the_proto_means_off():
    msg = step_to_proto(StepInput(1, new_requests=[new("a", [3], [1])]))
    msg.new_requests[0].sampling.repetition_penalty = 0.0  # proto3 default
    assert step_from_proto(msg).new_requests[0].sampling.repetition_penalty == 1.0


# --- scheduler ----------------------------------------------------------------------------------


def test_step_to_proto_carries_bitmasks_penalty_prompt_and_tokens_generated_before():
    repetition = SamplingParams(repetition_penalty=1.3)
    stopping = StoppingCriteria(max_new_tokens=9, min_new_tokens=5)
    plan = StepInput(
        3,
        new_requests=[
            NewRequest(
                "a",
                [4, 5],
                [7, 8],
                [1, 2, 3],
                sampling=repetition,
                token_bitmask=bitmask([1]),
                penalty_prompt_ids=[1, 2, 3, 4, 5],
                stopping=stopping,
                generated_tokens=2,
            ),
            NewRequest("b", [6], [9], stopping=stopping),
        ],
        continuing_requests=[ContinuingRequest("c", [10], token_bitmask=bitmask([2]))],
    )
    msg = step_to_proto(plan)
    a, b = msg.new_requests
    assert list(a.penalty_prompt_ids) == [1, 2, 3, 4, 5] and a.token_bitmask == bitmask([1])
    assert a.stopping.min_new_tokens == 5 and a.generated_tokens == 2
    assert a.sampling.repetition_penalty == pytest.approx(1.3)
    assert (
        list(b.penalty_prompt_ids) == []
        and b.stopping.min_new_tokens == 5
        and b.generated_tokens == 0
    )
    assert b.token_bitmask == b""
    assert msg.continuing_requests[0].token_bitmask == bitmask([2])


def test_retracted_request_is_resent_with_its_whole_sequence():
    h = Harness(pool_size=48, schedule_conservativeness=0.0, min_new_token_ratio=0.0)
    sampling = SamplingParams(repetition_penalty=1.1)
    for i, prompt in enumerate(prompts(6, length=8, shared=3)):
        h.add(f"r{i}", prompt, max_new=20, ignore_eos=True, sampling=sampling, min_new_tokens=15)
    h.run()
    readmitted = [(p, n) for p in h.plans for n in p.new_requests if n.generated_tokens]
    assert h.sched.num_retractions > 0 and readmitted
    for plan, n in readmitted:
        prompt = prompts(6, length=8, shared=3)[int(n.request_id[1:])]
        assert n.penalty_prompt_ids == prompt + h.outputs[n.request_id][: n.generated_tokens]
        sent = next(r for r in step_to_proto(plan).new_requests if r.request_id == n.request_id)
        assert list(sent.penalty_prompt_ids) == n.penalty_prompt_ids
        # The request's own stop conditions go out unchanged, with the count the executor discounts.
        assert sent.stopping.min_new_tokens == 15 and sent.generated_tokens == n.generated_tokens


def test_scheduler_does_not_stop_before_min_new_tokens():
    prompt = [1, 2, 3]
    ref = reference_tokens(prompt, 8)
    assert len({ref[0], ref[1], ref[4]}) == 3
    h = Harness(eos_token_ids=[ref[1]])
    h.add("eos", prompt, max_new=8, min_new_tokens=2, stop_token_ids=(ref[0], ref[4]))
    h.add("plain", prompt, max_new=8, stop_token_ids=(ref[0],))
    h.run()
    assert h.outputs["eos"] == ref[:5] and h.finals["eos"].matched_stop_token_id == ref[4]
    assert h.outputs["plain"] == ref[:1] and h.finals["plain"].finish_reason == FinishReason.STOP


# --- gateway ------------------------------------------------------------------------------------

DEFAULTS = dict(
    temperature=None,
    top_p=None,
    top_k=None,
    min_p=None,
    seed=None,
    max_tokens=None,
    stop_token_ids=None,
    ignore_eos=False,
)


@pytest.mark.parametrize(
    "options, param",
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": {"-3": 1.0}}, "logit_bias"),
        ({"logit_bias": {str(2**31): 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
        (
            {"min_tokens": 9, "max_tokens": 8, "min_tokens_param": "min_new_tokens"},
            "min_new_tokens",
        ),
    ],
)
def test_build_sampling_rejects_bad_options(options, param):
    with pytest.raises(ApiError) as err:
        build_sampling(**{**DEFAULTS, **options})
    assert err.value.status == 400 and err.value.param == param


def test_options_reach_the_sampling_params_from_every_api():
    body = {
        "frequency_penalty": 0.5,
        "presence_penalty": -1.0,
        "repetition_penalty": 1.1,
        "logit_bias": {"12": -100, "7": 3.5},
        "min_tokens": 4,
        "max_tokens": 10,
    }
    chat = chat_input(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **body))
    text = completion_input(CompletionRequest(prompt="hi", **body))
    for s, stop in ((chat.sampling, chat.stopping), (text.sampling, text.stopping)):
        assert (s.frequency_penalty, s.presence_penalty, stop.min_new_tokens) == (0.5, -1.0, 4)
        assert s.repetition_penalty == pytest.approx(1.1) and dict(s.logit_bias) == {
            12: -100.0,
            7: 3.5,
        }
    native = native_input(
        NativeGenerateRequest(
            text="hi",
            sampling_params={
                "frequency_penalty": 0.25,
                "repetition_penalty": 1.5,
                "min_new_tokens": 3,
            },
        )
    )
    assert (
        native.sampling.frequency_penalty,
        native.sampling.repetition_penalty,
        native.stopping.min_new_tokens,
    ) == (0.25, 1.5, 3)
    defaults = completion_input(CompletionRequest(prompt="hi"))
    assert (
        defaults.sampling.frequency_penalty,
        defaults.sampling.repetition_penalty,
        defaults.stopping.min_new_tokens,
    ) == (0, 1, 0)
    grpc_sampling = common_pb2.SamplingParams(presence_penalty=1.5, logit_bias={4: 9.0})
    grpc_input = generation_input(
        gateway_pb2.GatewayGenerateRequest(
            text="hi",
            sampling=grpc_sampling,
            stopping=common_pb2.StoppingCriteria(min_new_tokens=2),
        ),
        MediaLimits.from_args(ServerArgs()),
    )
    via_grpc = grpc_input.sampling
    assert (
        via_grpc.presence_penalty,
        grpc_input.stopping.min_new_tokens,
        dict(via_grpc.logit_bias),
    ) == (1.5, 2, {4: 9.0})
    assert via_grpc.repetition_penalty == 1.0
