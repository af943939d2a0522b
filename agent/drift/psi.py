"""The population stability index over an input histogram: the drift score of bundles made before
``agent.drift.reference`` existed (and reported beside the tests for newer ones).

PSI = sum over bins of (live - ref) * ln(live / ref): below 0.1 is usually read as no change,
0.1-0.25 as moderate, above 0.25 as a significant shift. It has no sample size in it, so on small
windows it measures noise; the tests in ``agent.drift.monitor`` replace it where the bundle allows.
"""

from __future__ import annotations

import collections

import numpy as np

#: values per input and sample that are binned (a strided subsample of larger inputs)
MAX_VALUES = 2048
#: smoothing of empty bins (a bin with no values would make PSI infinite)
EPSILON = 1e-4


def psi(reference: np.ndarray, live: np.ndarray) -> float:
    """Population stability index of two frequency vectors (each is normalised here)."""
    ref = np.asarray(reference, np.float64) + EPSILON
    cur = np.asarray(live, np.float64) + EPSILON
    ref, cur = ref / ref.sum(), cur / cur.sum()
    return float(np.sum((cur - ref) * np.log(cur / ref)))


class _Window:
    """Per-bin counts of the last ``size`` samples, kept as a running sum."""

    def __init__(self, bins: int, size: int):
        self.parts: collections.deque[np.ndarray] = collections.deque()
        self.total = np.zeros(bins, np.int64)
        self.samples = 0
        self.size = size

    def add(self, counts: np.ndarray, samples: int) -> None:
        self.parts.append((counts, samples))
        self.total += counts
        self.samples += samples
        while self.samples - self.parts[0][1] >= self.size and len(self.parts) > 1:
            old, old_samples = self.parts.popleft()
            self.total -= old
            self.samples -= old_samples


class HistogramScore:
    """PSI of one input's values against its reference histogram, over a sliding window."""

    def __init__(self, edges: np.ndarray, counts: np.ndarray, window: int):
        self.inner, self.reference = edges[1:-1], counts  # values outside the edges land in the end bins
        self.window = _Window(len(counts), window)
        self.range = (float(edges[0]), float(edges[-1])) if np.isfinite(edges[[0, -1]]).all() else None

    @classmethod
    def of(cls, stats, window: int) -> "HistogramScore | None":
        """From an input's reference statistics; None when they hold no usable histogram."""
        histogram = stats.get("histogram") if isinstance(stats, dict) else None
        if not histogram or len(histogram.get("edges", [])) < 3:
            return None
        edges = np.asarray(histogram["edges"], np.float64)
        counts = np.asarray(histogram.get("counts", []), np.float64)
        if counts.shape != (len(edges) - 1,) or not np.all(np.diff(edges) >= 0):
            return None  # a malformed reference: no drift score rather than a broken request
        return cls(edges, counts, window)

    def counts(self, array):
        """(bin counts, samples) of one run's values, or None when the input is absent or not numeric."""
        if array is None or array.dtype.kind not in "fiu" or not array.size:
            return None
        flat = array.reshape(-1)
        step = max(1, flat.size // (MAX_VALUES * max(1, array.shape[0] if array.ndim else 1)))
        counts = np.bincount(np.searchsorted(self.inner, flat[::step], side="right"), minlength=len(self.inner) + 1)
        return counts, array.shape[0] if array.ndim else 1

    def add(self, prepared) -> None:
        self.window.add(*prepared)

    def psi(self, total: np.ndarray) -> float:
        return round(psi(self.reference, total), 4)
