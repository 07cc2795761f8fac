"""Evaluation statistics: pass@k, avg@n and bootstrap confidence intervals over prompts.

The unit of resampling is the prompt. A prompt's n samples are not independent draws of the
population of problems (they share the problem), so every interval resamples prompts, each carrying
its per-prompt value (the mean of its samples); differences between two models on the same prompts
resample the prompts once for both (a paired bootstrap), which removes the variance that the two
models share through the problems' difficulty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 2000
"""Bootstrap resamples per interval, by default."""

CONFIDENCE = 0.95


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021).

    1 − C(n−c, k) / C(n, k), written as 1 − Π_{i=n−c+1}^{n} (1 − k/i): no huge binomials, no overflow.
    """
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)) or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs integers 0 ≤ c ≤ n and 1 ≤ k ≤ n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_n(scores: np.ndarray) -> np.ndarray:
    """Per-prompt mean score over its n samples: scores [prompts, n] → [prompts]; the mean of it is avg@n."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"avg_at_n needs a [prompts, samples] array, got shape {scores.shape}")
    return scores.mean(axis=1)


def pass_at_k_per_prompt(correct: np.ndarray, k: int) -> np.ndarray:
    """pass@k of each prompt from a boolean [prompts, n] array of correct samples."""
    correct = np.asarray(correct, dtype=bool)
    n = correct.shape[1]
    return np.array([pass_at_k(n, int(c), k) for c in correct.sum(axis=1)])


def bootstrap_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement) of `values`; the same seed gives the same draws.

    Drawn in blocks of about 4M indices, so a large eval never holds an [n_resamples, n] index array.
    """
    n = len(values)
    if n < 1:
        raise ValueError("a bootstrap needs at least one value")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be ≥ 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    block = max(1, 2**22 // n)
    means = np.empty(n_resamples)
    for s in range(0, n_resamples, block):
        m = min(block, n_resamples - s)
        means[s:s + m] = values[rng.integers(0, n, size=(m, n))].mean(axis=1)
    return means


def _percentiles(means: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_ci(values: Sequence[float], *, n_resamples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one value per prompt)."""
    return _percentiles(bootstrap_means(np.asarray(values, dtype=float), n_resamples, seed), confidence)


def paired_bootstrap_ci(candidate: Sequence[float], baseline: Sequence[float], *,
                        n_resamples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of candidate − baseline and its percentile bootstrap interval, resampling prompts (paired).

    candidate[i] and baseline[i] must be the two models' values on the same prompt i.
    Returns (difference, low, high).
    """
    c, b = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    if c.shape != b.shape or c.ndim != 1:
        raise ValueError(f"paired values need equal 1-d shapes (one per prompt), got {c.shape} and {b.shape}")
    d = c - b
    low, high = _percentiles(bootstrap_means(d, n_resamples, seed), confidence)
    return float(d.mean()), low, high
