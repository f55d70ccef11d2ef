"""SamplingParams' prompt logprob fields: the proto round trip (unset vs 0) and the limits."""

import pytest

from radixserve.common.sampling import MAX_PROMPT_LOGPROB_VALUES, SamplingError, SamplingParams


def test_proto_round_trip_keeps_start_zero_apart_from_unset():
    asked = SamplingParams(prompt_logprob_start=0, prompt_top_logprobs_num=3)
    back = SamplingParams.from_proto(asked.to_proto())
    assert (back.prompt_logprob_start, back.prompt_top_logprobs_num) == (0, 3)
    assert back.wants_prompt_logprobs
    plain = SamplingParams.from_proto(SamplingParams().to_proto())
    assert plain.prompt_logprob_start == -1 and not plain.wants_prompt_logprobs


def test_values_limit_counts_positions_times_one_plus_top():
    top = 3
    positions = MAX_PROMPT_LOGPROB_VALUES // (1 + top)
    ok = SamplingParams(prompt_logprob_start=0, prompt_top_logprobs_num=top)
    ok.check_prompt_logprobs(positions + 1)  # the first token has no logprob
    with pytest.raises(SamplingError) as e:
        ok.check_prompt_logprobs(positions + 2)
    assert e.value.param == "prompt_logprobs"
    # Starting later asks for fewer positions.
    SamplingParams(prompt_logprob_start=10, prompt_top_logprobs_num=top).check_prompt_logprobs(
        positions + 10
    )


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt_logprob_start": -2}, "logprob_start_len"),
        ({"prompt_logprob_start": 0, "prompt_top_logprobs_num": 21}, "prompt_logprobs"),
    ],
)
def test_check_rejects_out_of_range(fields, param):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**fields).check()
    assert e.value.param == param


def test_start_must_lie_inside_the_prompt():
    with pytest.raises(SamplingError) as e:
        SamplingParams(prompt_logprob_start=5).check_prompt_logprobs(5)
    assert e.value.param == "logprob_start_len"
    SamplingParams(prompt_logprob_start=4).check_prompt_logprobs(5)
    SamplingParams().check_prompt_logprobs(0)  # not asked: nothing to check
