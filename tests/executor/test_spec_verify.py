"""Draft verification: greedy verification is exact, and speculative sampling emits tokens distributed
as the target's (chi-square tests on a 5-token vocabulary, fixed seeds)."""

import pytest
import torch

from radixserve.executor.spec_verify import (
    pad_positions,
    verify,
    verify_greedy,
    verify_sampling,
)

# Each chi-square test fails below this p-value: a false alarm rate of 1e-4 per test (about 1e-3
# over the file's tests); with the seeds fixed the outcome is deterministic.
FALSE_ALARM = 1e-4
SAMPLES = 20_000
DRAFTS = 3

# The target's distribution at each of the DRAFTS + 1 positions (unnormalised, as top-k leaves it:
# token 4 is excluded at position 1), and two draft distributions unlike it.
TARGET = torch.tensor(
    [
        [0.50, 0.20, 0.15, 0.10, 0.05],
        [0.30, 0.30, 0.20, 0.20, 0.00],
        [0.05, 0.10, 0.15, 0.30, 0.40],
        [0.20, 0.20, 0.20, 0.20, 0.20],
    ],
    dtype=torch.float64,
)
TARGET = TARGET * 3  # rows need not sum to 1
DRAFT = torch.tensor(
    [
        [0.10, 0.10, 0.20, 0.20, 0.40],
        [0.05, 0.15, 0.20, 0.20, 0.40],
        [0.40, 0.30, 0.10, 0.10, 0.10],
    ],
    dtype=torch.float64,
)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi-square >= observed) for counts against probs (entries of probability 0 must be empty)."""
    probs = probs / probs.sum()
    assert counts[probs == 0].sum() == 0, "a token of target probability 0 was emitted"
    support = probs > 0
    expected = probs[support] * counts.sum()
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor((int(support.sum()) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic / 2))


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SAMPLES draft tokens per position from probs [DRAFTS, V]: [SAMPLES, DRAFTS]."""
    return torch.multinomial(probs, SAMPLES, replacement=True, generator=generator).T.contiguous()


def assert_emits_target_distribution(result):
    tokens, accepted = result.tokens, result.num_accepted
    for position in range(DRAFTS + 1):
        emitted = tokens[accepted >= position, position]
        counts = torch.bincount(emitted, minlength=TARGET.shape[1]).to(torch.float64)
        assert chi_square_p_value(counts, TARGET[position]) >= FALSE_ALARM, position


def acceptance_rate_matches(result, rate: torch.Tensor):
    """The fraction accepting the first draft token is within 5 standard errors of rate."""
    observed = (result.num_accepted >= 1).to(torch.float64).mean()
    error = (rate * (1 - rate) / SAMPLES).sqrt()
    return abs(float(observed - rate)) < 5 * float(error)


def test_point_mass_drafts_keep_the_target_distribution():
    generator = torch.Generator().manual_seed(1)
    drafts = draw(DRAFT, generator)
    target = TARGET.expand(SAMPLES, -1, -1)
    result = verify_sampling(
        target, drafts, [DRAFTS] * SAMPLES, default_generator=torch.Generator().manual_seed(2)
    )
    assert_emits_target_distribution(result)
    # A point-mass draft d is kept with probability p(d).
    p = TARGET[0] / TARGET[0].sum()
    assert acceptance_rate_matches(result, (DRAFT[0] * p).sum())
    # The test has the power to see a wrong distribution: the drafts themselves fail it.
    draft_counts = torch.bincount(drafts[:, 0], minlength=5).to(torch.float64)
    assert chi_square_p_value(draft_counts, TARGET[0]) < FALSE_ALARM


def test_full_distribution_drafts_keep_the_target_distribution():
    generator = torch.Generator().manual_seed(3)
    drafts = draw(DRAFT, generator)
    target = TARGET.expand(SAMPLES, -1, -1)
    draft_probs = (DRAFT * 7).expand(SAMPLES, -1, -1)  # normalised inside, like the target
    result = verify_sampling(
        target,
        drafts,
        [DRAFTS] * SAMPLES,
        draft_probs,
        default_generator=torch.Generator().manual_seed(4),
    )
    assert_emits_target_distribution(result)
    p = TARGET[0] / TARGET[0].sum()
    assert acceptance_rate_matches(result, torch.minimum(p, DRAFT[0]).sum())


def random_logits(batch=3, drafts=4, vocab=11, seed=0):
    return torch.randn(batch, drafts + 1, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_always_right_and_always_wrong_drafts():
    logits = random_logits()
    best = logits.argmax(-1)
    right = verify_greedy(logits, best[:, :-1], [4, 4, 4]).result()
    assert right.num_accepted == [4, 4, 4]
    assert right.token_ids == best.tolist()
    wrong = verify_greedy(logits, (best[:, :-1] + 1) % 11, [4, 4, 4]).result()
    assert wrong.num_accepted == [0, 0, 0]
    assert wrong.token_ids == best[:, :1].tolist()


def test_greedy_stops_at_the_first_mismatch_and_at_each_draft_length():
    logits = random_logits()
    best = logits.argmax(-1)
    drafts = best[:, :-1].clone()
    drafts[0, 2] = (drafts[0, 2] + 1) % 11
    drafts[1, 3] = (drafts[1, 3] + 1) % 11  # past request 1's draft: ignored
    drafts[2] = -1  # padding: request 2 has no draft
    result = verify_greedy(logits, drafts, [4, 2, 0]).result()
    assert result.num_accepted == [2, 2, 0]
    assert result.token_ids == [best[0, :3].tolist(), best[1, :3].tolist(), best[2, :1].tolist()]


@pytest.mark.parametrize("full_distribution", [False, True])
def test_sampling_a_certain_target_is_greedy(full_distribution):
    logits = random_logits()
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 11).to(torch.float32)
    best = logits.argmax(-1)
    draft_probs = torch.full((3, 4, 11), 1 / 11) if full_distribution else None
    for drafts in (best[:, :-1], (best[:, :-1] + 1) % 11):
        exact = verify_greedy(logits, drafts, [4, 3, 1]).result()
        sampled = verify_sampling(one_hot, drafts, [4, 3, 1], draft_probs).result()
        assert sampled == exact


def test_a_seeded_request_does_not_depend_on_its_batch():
    logits = random_logits(batch=4, drafts=5, vocab=7, seed=5)
    probs = torch.softmax(logits, -1)
    drafts = probs[:, :-1].argmax(-1)  # likely drafts, so some are accepted
    alone = verify_sampling(
        probs[2:3, :3], drafts[2:3, :2], [2], generators=[torch.Generator().manual_seed(9)]
    ).result()
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(9), None]
    batched = verify_sampling(probs, drafts, [5, 4, 2, 0], generators=gens).result()
    assert batched.token_ids[2] == alone.token_ids[0]
    assert batched.num_accepted[2] == alone.num_accepted[0]


def test_mixed_batch_verifies_greedy_rows_exactly_without_their_generators():
    logits = random_logits(batch=2, drafts=3, vocab=7, seed=6)
    probs = torch.softmax(logits, -1)
    drafts = (probs[:, :-1].argmax(-1) + 1) % 7
    greedy_gen = torch.Generator().manual_seed(3)
    state = greedy_gen.get_state()
    gens = [greedy_gen, torch.Generator().manual_seed(4)]
    mixed = verify(probs, drafts, [3, 3], [True, False], generators=gens).result()
    assert torch.equal(greedy_gen.get_state(), state)
    exact = verify_greedy(probs, drafts, [3, 3]).result()
    assert mixed.token_ids[0] == exact.token_ids[0]
    alone = verify_sampling(
        probs[1:], drafts[1:], [3], generators=[torch.Generator().manual_seed(4)]
    ).result()
    assert mixed.token_ids[1] == alone.token_ids[0]


def test_pad_positions_repeats_each_requests_last_row():
    flat = torch.arange(6 * 2, dtype=torch.float32).reshape(
        6, 2
    )  # drafts of 2, 0, 1: 3 + 1 + 2 rows
    padded = pad_positions(flat, [2, 0, 1])
    assert padded.shape == (3, 3, 2)
    assert padded[:, :, 0].tolist() == [[0, 2, 4], [6, 6, 6], [8, 10, 10]]
    with pytest.raises(ValueError):
        pad_positions(flat, [2, 1])
