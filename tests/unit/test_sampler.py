"""Exact numbers for every sampling parameter on small logits vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.engine.sampler import MAX_TOP_LOGPROBS, SampledToken, greedy_batch, make_sampler
from service.engine.types import SamplingParams


def row(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def lse(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def draw_counts(params: SamplingParams, logits: np.ndarray, n: int = 4000) -> np.ndarray:
    sampler = make_sampler(params, [], logits.size)
    return np.bincount([sampler.sample(logits).token_id for _ in range(n)], minlength=logits.size)


# --- greedy ---------------------------------------------------------------------------------------------


def test_greedy_picks_argmax_and_breaks_ties_by_lowest_id() -> None:
    sampler = make_sampler(SamplingParams(), [], 4)
    assert sampler.fast_greedy
    assert sampler.sample(row(1, 3, 3, 2)) == SampledToken(1, None, ())


def test_greedy_batch_matches_per_row_argmax_with_lowest_id_ties() -> None:
    logits = np.array([[0, 5, 5, 1], [9, 0, 0, 9], [-1, -2, -0.5, -3]], dtype=np.float32)
    ids = greedy_batch(logits)
    assert ids.dtype == np.int64
    assert ids.tolist() == [1, 0, 2]


def test_greedy_batch_rejects_a_single_row() -> None:
    with pytest.raises(ValueError, match=r"shape \(batch, vocab\)"):
        greedy_batch(row(1, 2))


def test_greedy_logprobs_are_log_softmax_at_temperature_one() -> None:
    sampler = make_sampler(SamplingParams(logprobs=True, top_logprobs=2), [], 4)
    assert not sampler.fast_greedy
    out = sampler.sample(row(1, 2, 3, 4))
    z = lse([1, 2, 3, 4])
    assert out.token_id == 3
    assert out.logprob == pytest.approx(4 - z, abs=1e-12)
    assert [i for i, _ in out.top] == [3, 2]
    assert [lp for _, lp in out.top] == pytest.approx([4 - z, 3 - z], abs=1e-12)


def test_top_logprobs_ties_are_listed_lowest_id_first() -> None:
    out = make_sampler(SamplingParams(top_logprobs=3), [], 5).sample(row(0, 7, 1, 7, 7))
    # top_logprobs implies the chosen token's logprob
    assert out.logprob is not None
    assert [i for i, _ in out.top] == [1, 3, 4]


# --- penalties ------------------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    params = SamplingParams(repetition_penalty=2.0, logprobs=True, top_logprobs=4)
    sampler = make_sampler(params, [0, 1, 1], 4)
    out = sampler.sample(row(2.0, -2.0, 1.0, 0.5))
    penalised = [1.0, -4.0, 1.0, 0.5]  # ids 0 and 1 were in the prompt; 2 and 3 untouched
    z = lse(penalised)
    assert out.token_id == 0  # tie 1.0 / 1.0 -> lowest id
    assert dict(out.top) == pytest.approx({i: v - z for i, v in enumerate(penalised)}, abs=1e-12)
    sampler.accept(2)  # generated tokens join the seen set
    out = sampler.sample(row(2.0, -2.0, 1.0, 0.5))
    penalised = [1.0, -4.0, 0.5, 0.5]
    assert dict(out.top) == pytest.approx({i: v - lse(penalised) for i, v in enumerate(penalised)}, abs=1e-12)


def test_presence_and_frequency_penalties_count_generated_tokens_only() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logprobs=True, top_logprobs=4)
    sampler = make_sampler(params, [3, 3, 3], 4)  # prompt tokens are not penalised by these two
    for token in (1, 1, 2):
        sampler.accept(token)
    out = sampler.sample(row(1, 1, 1, 1))
    penalised = [1.0, 1 - 0.5 - 2 * 0.25, 1 - 0.5 - 0.25, 1.0]
    assert out.token_id == 0
    assert dict(out.top) == pytest.approx({i: v - lse(penalised) for i, v in enumerate(penalised)}, abs=1e-12)


def test_repetition_penalty_applies_before_presence_penalty() -> None:
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, logprobs=True, top_logprobs=2)
    sampler = make_sampler(params, [], 2)
    sampler.accept(0)
    out = sampler.sample(row(4.0, 0.0))
    penalised = [4.0 / 2 - 1.0, 0.0]  # (4 / 2) - 1 = 1; the other order would give 1.5
    assert dict(out.top) == pytest.approx({0: 1.0 - lse(penalised), 1: -lse(penalised)}, abs=1e-12)


def test_penalties_and_temperature_never_modify_the_callers_logits() -> None:
    batch = np.array([[1, 2, 3, 4], [4, 3, 2, 1]], dtype=np.float32)
    before = batch.copy()
    params = SamplingParams(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.4, seed=1)
    sampler = make_sampler(params, [0, 2], 4)
    sampler.accept(3)
    sampler.sample(batch[1])  # a view into the batch buffer
    greedy = make_sampler(SamplingParams(repetition_penalty=1.3), [0, 2], 4)
    greedy.sample(batch[0])
    np.testing.assert_array_equal(batch, before)


def test_accept_rejects_out_of_range_ids() -> None:
    sampler = make_sampler(SamplingParams(), [], 4)
    with pytest.raises(ValueError, match=r"token_id must be in \[0, 4\), got 4"):
        sampler.accept(4)


# --- temperature and filters ----------------------------------------------------------------------------


def test_temperature_divides_logits_before_softmax() -> None:
    # logits [0, 2 ln 3] at temperature 2 -> [0, ln 3] -> probabilities [1/4, 3/4]
    params = SamplingParams(temperature=2.0, seed=0, top_logprobs=2)
    out = make_sampler(params, [], 2).sample(row(0.0, 2 * math.log(3)))
    assert dict(out.top) == pytest.approx({0: math.log(0.25), 1: math.log(0.75)}, abs=1e-6)


def test_top_k_keeps_only_the_k_largest_with_renormalised_probabilities() -> None:
    params = SamplingParams(temperature=1.0, top_k=2, seed=3, top_logprobs=4)
    logits = row(1, 2, 3, 4)
    out = make_sampler(params, [], 4).sample(logits)
    p3 = math.exp(4) / (math.exp(3) + math.exp(4))
    assert [i for i, _ in out.top] == [3, 2]  # only 2 candidates survive, so only 2 are listed
    assert dict(out.top) == pytest.approx({3: math.log(p3), 2: math.log(1 - p3)}, abs=1e-6)
    counts = draw_counts(params, logits)
    assert counts[0] == counts[1] == 0
    assert counts[3] / counts.sum() == pytest.approx(p3, abs=0.03)  # p3 = 0.731; seeded, so stable


def test_top_k_ties_at_the_cut_keep_the_lowest_ids() -> None:
    params = SamplingParams(temperature=1.0, top_k=2, seed=0, top_logprobs=5)
    out = make_sampler(params, [], 5).sample(row(0, 5, 1, 1, 1))
    assert [i for i, _ in out.top] == [1, 2]


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = np.log(np.array(probs, dtype=np.float32))
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=0, top_logprobs=4)
    out = make_sampler(params, [], 4).sample(logits)
    # 0.5 < 0.75 <= 0.5 + 0.3: ids 0 and 1 survive, renormalised over 0.8
    assert dict(out.top) == pytest.approx({0: math.log(0.5 / 0.8), 1: math.log(0.3 / 0.8)}, abs=1e-6)
    counts = draw_counts(params, logits)
    assert counts[2] == counts[3] == 0
    assert counts[0] / counts.sum() == pytest.approx(0.625, abs=0.03)


def test_top_p_always_keeps_at_least_the_most_likely_token() -> None:
    params = SamplingParams(temperature=1.0, top_p=1e-9, logprobs=True)
    sampler = make_sampler(params, [], 3)
    for _ in range(20):
        out = sampler.sample(row(1.0, 1.5, 0.2))
        assert out.token_id == 1
        assert out.logprob == 0.0


def test_top_p_grows_its_candidate_set_beyond_the_first_guess() -> None:
    # 1000 equally likely tokens, top_p 0.5 -> exactly 500 survive (more than the first 64 candidates)
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=0, logprobs=True)
    out = make_sampler(params, [], 1000).sample(np.zeros(1000, dtype=np.float32))
    assert out.logprob == pytest.approx(math.log(1 / 500), abs=1e-9)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = np.log(np.array(probs, dtype=np.float32))
    # threshold 0.35 * 0.5 = 0.175: ids 0 and 1 survive
    params = SamplingParams(temperature=1.0, min_p=0.35, seed=0, top_logprobs=4)
    out = make_sampler(params, [], 4).sample(logits)
    assert dict(out.top) == pytest.approx({0: math.log(0.5 / 0.8), 1: math.log(0.3 / 0.8)}, abs=1e-6)


def test_filters_compose_top_k_then_top_p_then_min_p() -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = np.log(np.array(probs, dtype=np.float32))
    # top_k=3 -> [0.4, 0.3, 0.2] / 0.9; top_p=0.7 -> 0.444 + 0.333 >= 0.7 keeps ids 0, 1;
    # min_p=0.8 -> 0.3 < 0.8 * 0.4 drops id 1: only id 0 is left.
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.7, min_p=0.8, seed=0, top_logprobs=4)
    out = make_sampler(params, [], 4).sample(logits)
    assert out.token_id == 0
    assert out.top == ((0, 0.0),)


def test_logprobs_are_not_reported_unless_requested() -> None:
    out = make_sampler(SamplingParams(temperature=1.0, seed=0), [], 3).sample(row(1, 2, 3))
    assert out.logprob is None
    assert out.top == ()


# --- seeds ----------------------------------------------------------------------------------------------


def test_same_seed_same_tokens_and_different_seed_different_tokens() -> None:
    logits = np.zeros(8, dtype=np.float32)

    def run(seed: int) -> list[int]:
        sampler = make_sampler(SamplingParams(temperature=1.0, seed=seed), [], 8)
        return [sampler.sample(logits).token_id for _ in range(50)]

    assert run(1234) == run(1234)
    assert run(1234) != run(1235)


def test_seeded_draws_are_fixed_numbers() -> None:
    # Pins the draw algorithm (PCG64 -> one uniform per token -> inverse CDF in id order): changing it
    # changes every seeded response, which clients may rely on.
    sampler = make_sampler(SamplingParams(temperature=1.0, seed=42), [], 4)
    tokens = [sampler.sample(np.zeros(4, dtype=np.float32)).token_id for _ in range(8)]
    uniforms = np.random.Generator(np.random.PCG64(42)).random(8)
    assert tokens == [int(u * 4) for u in uniforms]


# --- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (SamplingParams(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
        (SamplingParams(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
        (SamplingParams(temperature=math.nan), "temperature must be a finite number >= 0, got nan"),
        (SamplingParams(top_k=-1), "top_k must be >= 0, got -1"),
        (SamplingParams(min_p=1.5), "min_p must be in [0, 1], got 1.5"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0, got 0.0"),
        (SamplingParams(presence_penalty=math.inf), "presence_penalty must be finite, got inf"),
        (SamplingParams(frequency_penalty=math.nan), "frequency_penalty must be finite, got nan"),
        (SamplingParams(top_logprobs=MAX_TOP_LOGPROBS + 1), "top_logprobs must be in [0, 20], got 21"),
        (SamplingParams(seed=-1), "seed must be >= 0, got -1"),
    ],
)
def test_make_sampler_rejects_values_that_would_crash_or_give_nan(
    params: SamplingParams, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        make_sampler(params, [], 4)
    assert str(info.value) == message


def test_make_sampler_rejects_prompt_ids_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match=r"prompt_ids must be in \[0, 4\)"):
        make_sampler(SamplingParams(repetition_penalty=1.1), [1, 4], 4)


def test_sample_rejects_a_row_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"logits must have shape \(4,\), got \(3,\)"):
        make_sampler(SamplingParams(), [], 4).sample(row(1, 2, 3))


def test_blocked_draw_equals_a_full_inverse_cdf_over_a_large_vocabulary() -> None:
    # 1000 tokens span several draw blocks: each draw must equal searchsorted over the full cumsum
    logits = np.random.default_rng(5).normal(0.0, 2.0, 1000).astype(np.float32)
    sampler = make_sampler(SamplingParams(temperature=1.0, seed=7), [], 1000)
    got = [sampler.sample(logits).token_id for _ in range(200)]
    weights = np.exp(logits.astype(np.float64) - logits.max())
    cdf = np.cumsum(weights)
    uniforms = np.random.Generator(np.random.PCG64(7)).random(200)
    assert got == [int(np.searchsorted(cdf, u * cdf[-1], side="right")) for u in uniforms]


def test_masked_tokens_are_never_drawn() -> None:
    logits = np.full(600, -np.inf, dtype=np.float32)
    logits[[300, 599]] = [0.0, math.log(3.0)]  # in different draw blocks; probabilities 1/4, 3/4
    counts = draw_counts(SamplingParams(temperature=1.0, seed=11), logits)
    assert set(np.flatnonzero(counts).tolist()) == {300, 599}
    assert counts[599] / counts.sum() == pytest.approx(0.75, abs=0.03)
