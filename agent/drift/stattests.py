"""Two-sample tests with p-values, in numpy alone (the agent runs on devices without SciPy).

- :func:`ks_test`: Kolmogorov–Smirnov between a reference (its sorted values, or evenly spaced
  quantiles of a larger sample: the statistic is then a lower bound of the exact one) and live values, with the asymptotic p-value for the two sample sizes (Stephens' small-sample correction).
  Conservative for discrete data (ties), which only lowers the false-alarm rate.
- :func:`g_test`: the G-test of homogeneity of two count vectors (reference class counts against live
  ones), with categories whose expected count is under 5 in either row pooled into one, so a thousand
  classes seen once or twice each are not read as a thousand changes.
"""

from __future__ import annotations

import math

import numpy as np

#: a pooled category needs at least this expected count in both rows (the chi-squared approximation's rule)
MIN_EXPECTED = 5.0


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution."""
    if lam < 0.2:
        return 1.0
    k = np.arange(1, 101)
    total = 2.0 * float(np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * (k * lam) ** 2)))
    return min(1.0, max(0.0, total))


def ks_statistic(reference: np.ndarray, live: np.ndarray, summarised: bool = False) -> float:
    """sup |F_ref - F_live| over all values (``reference`` sorted).

    ``summarised``: ``reference`` holds evenly spaced quantiles of a larger sample, whose CDF between
    two stored quantiles is only known to lie between their ranks; the distance is then taken to that
    interval, a lower bound of the exact D (a step function through the quantiles lags the true CDF by
    up to one step, and raised false alarms above their rate on large references)."""
    live = np.sort(np.asarray(live, np.float64))
    points = np.concatenate([reference, live])
    live_cdf = np.searchsorted(live, points, side="right") / len(live)
    below = np.searchsorted(reference, points, side="right")
    if not summarised or len(reference) < 2:
        return float(np.max(np.abs(below / len(reference) - live_cdf)))
    step = len(reference) - 1
    low, high = np.maximum(below - 1, 0) / step, np.minimum(below, step) / step
    return float(np.max(np.maximum(low - live_cdf, live_cdf - high).clip(min=0.0)))


def ks_test(reference: np.ndarray, reference_count: int, live: np.ndarray) -> tuple[float, float]:
    """(D, p) of the two-sample K-S test; ``reference_count`` is the size of the sample ``reference``
    summarises (its p-value uses that size, not the number of stored quantiles)."""
    live = np.asarray(live, np.float64)
    live = live[np.isfinite(live)]
    if not len(live) or not len(reference):
        return 0.0, 1.0
    statistic = ks_statistic(np.asarray(reference, np.float64), live, summarised=reference_count > len(reference))
    n, m = float(reference_count), float(len(live))
    effective = math.sqrt(n * m / (n + m))
    return statistic, kolmogorov_sf((effective + 0.12 + 0.11 / effective) * statistic)


def chi2_sf(statistic: float, df: int) -> float:
    """P(X > statistic) for chi-squared with ``df`` degrees of freedom (exact for 1 and 2, else the
    Wilson–Hilferty approximation: within ~0.01 in p where alarms are decided)."""
    if statistic <= 0:
        return 1.0
    if df == 1:
        return math.erfc(math.sqrt(statistic / 2.0))
    if df == 2:
        return math.exp(-statistic / 2.0)
    z = ((statistic / df) ** (1.0 / 3.0) - (1.0 - 2.0 / (9.0 * df))) / math.sqrt(2.0 / (9.0 * df))
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def pool_rare(reference: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 2xK table with every category whose expected count is under :data:`MIN_EXPECTED` in either row
    moved into one "other" column (itself dropped if still too small)."""
    table = np.stack([np.asarray(reference, np.float64), np.asarray(live, np.float64)])
    rows = table.sum(axis=1, keepdims=True)
    columns = table.sum(axis=0)
    expected = rows * columns / max(table.sum(), 1.0)
    kept = (expected >= MIN_EXPECTED).all(axis=0)
    other = table[:, ~kept].sum(axis=1, keepdims=True)
    pooled = table[:, kept]
    if (rows * other.sum() / max(table.sum(), 1.0) >= MIN_EXPECTED).all():
        pooled = np.concatenate([pooled, other], axis=1)
    return pooled[0], pooled[1]


def g_test(reference: np.ndarray, live: np.ndarray) -> tuple[float, float, int]:
    """(G, p, categories after pooling) of the G-test of homogeneity; p is 1 when fewer than two
    categories are left (too few samples to say anything)."""
    ref, cur = pool_rare(reference, live)
    if len(ref) < 2 or ref.sum() <= 0 or cur.sum() <= 0:
        return 0.0, 1.0, len(ref)
    table = np.stack([ref, cur])
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    observed = table > 0
    statistic = 2.0 * float(np.sum(table[observed] * np.log(table[observed] / expected[observed])))
    return statistic, chi2_sf(statistic, len(ref) - 1), len(ref)
