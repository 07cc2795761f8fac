"""Evaluation statistics against brute force and against simulation with a known truth."""

import itertools
import math

import numpy as np
import pytest

from components.evaluation.stats import avg_at_n, bootstrap_ci, paired_bootstrap_ci, pass_at_k, pass_at_k_per_prompt


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 0, 2), (5, 2, 1), (5, 2, 3), (6, 3, 4), (8, 1, 8),
                                   (10, 3, 5), (10, 7, 2), (12, 5, 6)])
def test_pass_at_k_equals_brute_force_over_k_subsets(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) ≈ 1e600 does not fit a float; the product form gives the exact value 1 − C(1000,1000)/C(2000,1000)
    assert pass_at_k(2000, 1000, 1000) == 1.0 - math.comb(1000, 1000) / math.comb(2000, 1000)
    assert pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000, rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="0 ≤ c ≤ n"):
        pass_at_k(n, c, k)


def test_avg_at_n_and_per_prompt_pass_at_k():
    correct = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    assert avg_at_n(correct).tolist() == [0.25, 1.0, 0.0]
    assert pass_at_k_per_prompt(correct, 1).tolist() == pytest.approx([0.25, 1.0, 0.0])
    assert pass_at_k_per_prompt(correct, 2).tolist() == pytest.approx([0.5, 1.0, 0.0])  # 1 − C(3,2)/C(4,2)


def test_bootstrap_ci_covers_the_true_mean_at_the_stated_rate():
    """400 seeded experiments: 60 prompts, each solved with probability 0.3 → the 95% interval holds 0.3 about 95%."""
    rng = np.random.default_rng(1234)
    trials, truth, covered = 400, 0.3, 0
    for t in range(trials):
        values = (rng.random(60) < truth).astype(float)
        low, high = bootstrap_ci(values, n_resamples=1000, seed=t)
        covered += low <= truth <= high
    assert 0.92 <= covered / trials <= 0.98


def test_paired_bootstrap_ci_covers_the_true_difference_and_is_narrower_than_unpaired():
    """Two models on shared problems: prompt difficulty is common to both, the pairing removes it."""
    rng = np.random.default_rng(7)
    trials, covered, widths_paired, widths_each = 400, 0, [], []
    for t in range(trials):
        difficulty = rng.normal(0, 1, 80)
        base = difficulty + rng.normal(0, 0.3, 80)
        cand = difficulty + 0.1 + rng.normal(0, 0.3, 80)  # true difference 0.1
        diff, low, high = paired_bootstrap_ci(cand, base, n_resamples=1000, seed=t)
        assert low <= diff <= high
        covered += low <= 0.1 <= high
        widths_paired.append(high - low)
        lo_c, hi_c = bootstrap_ci(cand, n_resamples=1000, seed=t)
        widths_each.append(hi_c - lo_c)
    assert 0.92 <= covered / trials <= 0.98
    assert np.mean(widths_paired) < 0.5 * np.mean(widths_each)


def test_bootstrap_is_seeded_and_checks_its_input():
    values = np.random.default_rng(0).normal(size=50)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(values, confidence=95)
