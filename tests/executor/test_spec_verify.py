"""Draft verification: greedy verification is exact, and speculative sampling emits tokens distributed
as the target's (chi-square tests on a 5-token vocabulary, fixed seeds)."""

import pytest
import torch

from radixserve.executor.spec_verify import (
    pad_positions,
    verify,
    verify_greedy,
    verify_sampling,
    verify_tree,
    verify_tree_greedy,
    verify_tree_sampling,
)

# Each chi-square test fails below this p-value: a false alarm rate of 1e-4 per test (about 1.3e-3
# over the file's 13 chi-square tests); with the seeds fixed the outcome is deterministic.
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


# Draft trees. TREE: the root's children are drafts 0, 1 and 2; draft 1 has children 3 and 4, and
# draft 3 has child 5. Draft i's row is i + 1.
TREE = [-1, -1, -1, 1, 1, 3]
TREE_TOKENS = torch.tensor([0, 1, 2, 3, 0, 4])
# The target at the root, then after each draft (unnormalised; token 2 excluded after draft 1).
TREE_TARGET = 3 * torch.tensor(
    [
        [0.30, 0.35, 0.15, 0.10, 0.10],
        [0.10, 0.20, 0.30, 0.20, 0.20],
        [0.30, 0.10, 0.00, 0.40, 0.20],
        [0.25, 0.25, 0.10, 0.10, 0.30],
        [0.10, 0.20, 0.30, 0.10, 0.30],
        [0.20, 0.20, 0.20, 0.20, 0.20],
        [0.40, 0.10, 0.10, 0.10, 0.30],
    ],
    dtype=torch.float64,
)


def logits_with_argmax(best: list[list[int]], vocab: int = 8, seed: int = 0) -> torch.Tensor:
    """[B, K + 1, vocab] random logits whose argmax at [b, j] is best[b][j]."""
    best = torch.tensor(best)
    logits = torch.randn(*best.shape, vocab, generator=torch.Generator().manual_seed(seed))
    return logits.scatter(2, best[..., None], 10.0)


def test_tree_greedy_follows_the_matching_branch():
    # Root children 0 (token 3) and 1 (token 5); 1 -> 2 -> 3 is a path, 4 hangs off draft 0.
    parents = [[-1, -1, 1, 2, 0]]
    drafts = torch.tensor([[3, 5, 6, 2, 4]])
    # The root's argmax is 5 (draft 1); draft 0's row would accept draft 4, but draft 0 is not.
    logits = logits_with_argmax([[5, 4, 6, 2, 7, 1]])
    verified = verify_tree_greedy(logits, drafts, parents)
    result = verified.result()
    assert result.token_ids == [[5, 6, 2, 7]]
    assert result.num_accepted == [3]
    assert result.rows == [[0, 2, 3, 4]]
    assert verified.rows.tolist() == [[0, 2, 3, 4, -1, -1]]  # accepted drafts 1, 2, 3
    host = verified.to_host()
    assert torch.equal(host.rows, verified.rows) and host.result() == result


def test_tree_greedy_accepts_nothing_or_a_whole_path():
    parents = [[-1, 0, -1, 1]]  # 0 -> 1 -> 3, and 2 beside 0
    drafts = torch.tensor([[3, 5, 6, 2]])
    nothing = verify_tree_greedy(logits_with_argmax([[7, 5, 1, 1, 1]]), drafts, parents).result()
    assert nothing.token_ids == [[7]] and nothing.rows == [[0]] and nothing.num_accepted == [0]
    # The root's argmax is draft 2's token: a leaf, so its row gives the final token.
    leaf = verify_tree_greedy(logits_with_argmax([[6, 5, 1, 4, 1]]), drafts, parents).result()
    assert leaf.token_ids == [[6, 4]] and leaf.rows == [[0, 3]]
    whole = verify_tree_greedy(logits_with_argmax([[3, 5, 2, 1, 0]]), drafts, parents).result()
    assert whole.token_ids == [[3, 5, 2, 0]]
    assert whole.rows == [[0, 1, 2, 4]] and whole.num_accepted == [3]  # drafts 0, 1, 3


def test_tree_greedy_pads_requests_of_different_trees():
    parents = [[-1, -1, 1, 2, 0], [-1, -1]]
    drafts = torch.tensor([[3, 5, 6, 2, 4], [1, 2, -1, -1, -1]])
    # Flat rows as the executor lays them out: 6 for request 0, then 3 for request 1.
    flat = torch.cat(
        [logits_with_argmax([[5, 4, 6, 2, 7, 1]])[0], logits_with_argmax([[2, 0, 6]], seed=1)[0]]
    )
    verified = verify_tree_greedy(pad_positions(flat, [5, 2]), drafts, parents)
    result = verified.result()
    assert result.token_ids == [[5, 6, 2, 7], [2, 6]]
    assert result.rows == [[0, 2, 3, 4], [0, 2]]
    assert verified.tokens[1].tolist() == [2, 6, -1, -1, -1, -1]
    assert verified.rows[1].tolist() == [0, 2, -1, -1, -1, -1]
    assert verified.rows[0].tolist() == [0, 2, 3, 4, -1, -1]


def test_tree_greedy_takes_the_first_of_equal_siblings_and_checks_parents():
    logits = logits_with_argmax([[4, 1, 2]])
    result = verify_tree_greedy(logits, torch.tensor([[4, 4]]), [[-1, -1]]).result()
    assert result.rows == [[0, 1]] and result.token_ids == [[4, 1]]
    for parents in ([[-1, 1]], [[0, -1]], [[-1, -2]], [[-1, -1, -1]], [[-1], [-1]]):
        with pytest.raises(ValueError):
            verify_tree_greedy(logits, torch.tensor([[4, 4]]), parents)


def chain(n: int) -> list[int]:
    return list(range(-1, n - 1))


def random_drafts(logits: torch.Tensor, num_drafts: list[int], seed: int) -> torch.Tensor:
    """Drafts that mostly follow the target's argmax, -1 past each request's length."""
    generator = torch.Generator().manual_seed(seed)
    best = logits[:, :-1].argmax(-1)
    guess = torch.randint(0, logits.shape[-1], best.shape, generator=generator)
    drafts = torch.where(torch.rand(best.shape, generator=generator) < 0.8, best, guess)
    lengths = torch.tensor(num_drafts)[:, None]
    return torch.where(torch.arange(best.shape[1])[None, :] < lengths, drafts, -1)


def test_tree_greedy_of_a_chain_is_verify_greedy():
    for seed in range(50):
        logits = random_logits(batch=4, drafts=5, vocab=4, seed=seed)
        num_drafts = [5, 3, 0, seed % 6]
        drafts = random_drafts(logits, num_drafts, seed)
        exact = verify_greedy(logits, drafts, num_drafts)
        tree = verify_tree_greedy(logits, drafts, [chain(n) for n in num_drafts])
        assert torch.equal(tree.tokens, exact.tokens), seed
        assert torch.equal(tree.num_accepted, exact.num_accepted), seed
        # A chain's token j comes from row j: rows 0 .. num_accepted, then -1.
        at = torch.arange(tree.tokens.shape[1])[None, :]
        rows = torch.where(at <= exact.num_accepted[:, None], at, -1)
        assert torch.equal(tree.rows, rows), seed


def test_tree_sampling_keeps_the_target_distribution():
    drafts = TREE_TOKENS.expand(SAMPLES, -1)
    target = TREE_TARGET.expand(SAMPLES, -1, -1)
    generator = torch.Generator().manual_seed(7)
    result = verify_tree_sampling(target, drafts, [TREE] * SAMPLES, default_generator=generator)
    tokens, rows = result.tokens, result.rows

    def counts(emitted):
        return torch.bincount(emitted, minlength=5).to(torch.float64)

    assert chi_square_p_value(counts(tokens[:, 0]), TREE_TARGET[0]) >= FALSE_ALARM
    # The test has the power to see a wrong distribution.
    assert chi_square_p_value(counts(tokens[:, 0]), TREE_TARGET[1]) < FALSE_ALARM
    # After each accepted child of the root, the next token follows the target after that child,
    # drawn from its row when it is a leaf (drafts 0, 2) or through its own children (draft 1).
    for child in (0, 1, 2):
        after = rows[:, 1] == child + 1
        assert (tokens[after, 0] == TREE_TOKENS[child]).all()
        p_value = chi_square_p_value(counts(tokens[after, 1]), TREE_TARGET[child + 1])
        assert p_value >= FALSE_ALARM, child
    # Through draft 1 then draft 3 (which has a child of its own), the third token.
    deep = (rows[:, 1] == 2) & (rows[:, 2] == 4)
    assert chi_square_p_value(counts(tokens[deep, 2]), TREE_TARGET[4]) >= FALSE_ALARM
    # Rows and tokens agree: each accepted draft's token is emitted at its depth.
    for depth in range(1, 4):
        accepted = result.num_accepted >= depth
        nodes = rows[accepted, depth] - 1
        assert torch.equal(tokens[accepted, depth - 1], TREE_TOKENS[nodes])
        assert torch.equal(torch.tensor(TREE)[nodes], rows[accepted, depth - 1] - 1)


def test_tree_sampling_a_certain_target_is_greedy():
    for seed in range(10):
        logits = random_logits(batch=3, drafts=4, vocab=4, seed=seed)
        one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 4).to(torch.float32)
        parents = [[-1, -1, 0, 1], [-1, 0, 0], [-1, -1]]
        # Distinct siblings, shifted by the root's argmax so that some drafts are accepted.
        drafts = torch.tensor([[0, 1, 2, 3], [1, 2, 3, -1], [3, 0, -1, -1]])
        drafts = torch.where(drafts >= 0, (drafts + logits[:, :1].argmax(-1)) % 4, -1)
        exact = verify_tree_greedy(logits, drafts, parents).result()
        assert verify_tree_sampling(one_hot, drafts, parents).result() == exact


def test_tree_sampling_of_a_chain_draws_as_verify_sampling():
    for seed in range(20):
        probs = torch.softmax(random_logits(batch=4, drafts=5, vocab=4, seed=seed), -1)
        num_drafts = [5, 3, 0, seed % 6]
        drafts = random_drafts(probs, num_drafts, seed)
        exact = verify_sampling(
            probs, drafts, num_drafts, default_generator=torch.Generator().manual_seed(seed)
        )
        tree = verify_tree_sampling(
            probs,
            drafts,
            [chain(n) for n in num_drafts],
            default_generator=torch.Generator().manual_seed(seed),
        )
        assert torch.equal(tree.tokens, exact.tokens), seed
        assert torch.equal(tree.num_accepted, exact.num_accepted), seed


def test_a_seeded_tree_request_does_not_depend_on_its_batch():
    probs = TREE_TARGET.to(torch.float32)
    drafts = TREE_TOKENS[None, :]
    for seed in range(10):
        alone = verify_tree_sampling(
            probs[None], drafts, [TREE], generators=[torch.Generator().manual_seed(seed)]
        ).result()
        # Between a request with a larger tree (unseeded) and one with a single draft (seeded).
        other = torch.softmax(random_logits(batch=2, drafts=7, vocab=5, seed=seed), -1)
        batch = torch.stack([other[0], torch.cat([probs, probs[-1:]]), other[1]])
        batch_drafts = torch.tensor(
            [[0, 1, 2, 3, 4, 0, 1], [*TREE_TOKENS.tolist(), -1], [2, -1, -1, -1, -1, -1, -1]]
        )
        gens = [None, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(99)]
        parents = [[-1, -1, -1, -1, -1, 0, 0], TREE, [-1]]
        batched = verify_tree_sampling(batch, batch_drafts, parents, generators=gens).result()
        assert batched.token_ids[1] == alone.token_ids[0], seed
        assert batched.rows[1] == alone.rows[0], seed


def test_mixed_tree_batch_verifies_greedy_rows_exactly_without_their_generators():
    probs = torch.softmax(random_logits(batch=2, drafts=6, vocab=5, seed=8), -1)
    drafts = TREE_TOKENS.expand(2, -1)
    greedy_gen = torch.Generator().manual_seed(3)
    state = greedy_gen.get_state()
    gens = [greedy_gen, torch.Generator().manual_seed(4)]
    mixed = verify_tree(probs, drafts, [TREE, TREE], [True, False], generators=gens).result()
    assert torch.equal(greedy_gen.get_state(), state)
    exact = verify_tree_greedy(probs, drafts, [TREE, TREE]).result()
    assert mixed.token_ids[0] == exact.token_ids[0] and mixed.rows[0] == exact.rows[0]
    alone = verify_tree_sampling(
        probs[1:], drafts[1:], [TREE], generators=[torch.Generator().manual_seed(4)]
    ).result()
    assert mixed.token_ids[1] == alone.token_ids[0] and mixed.rows[1] == alone.rows[0]
    assert verify_tree(probs, drafts, [TREE, TREE], [True, True]).result() == exact
