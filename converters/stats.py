"""Reference statistics of the calibration data, stored in the bundle for on-device drift detection."""

from __future__ import annotations

import numpy as np

HISTOGRAM_BINS = 20


#: float64 bytes one step of the statistics holds (the data set itself is never copied whole)
CHUNK_BYTES = 8 << 20


class _Moments:
    """Count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        """Fold in the values of a 1-D float64 array."""
        count = values.size
        if not count:
            return
        mean = values.mean()
        m2 = ((values - mean) ** 2).sum()
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / total
        self.count = total

    @property
    def std(self):
        return np.sqrt(self.m2 / self.count) if self.count else 0.0


def _chunks(values: np.ndarray):
    rows = len(values)
    per_row = max(1, values[0].size * 8) if rows else 8
    step = max(1, CHUNK_BYTES // per_row)
    for start in range(0, rows, step):
        yield values[start:start + step].astype(np.float64)


def tensor_stats(array: np.ndarray) -> dict:
    """Mean, std, min, max and a histogram of all values; per-channel mean/std for axis 1 when small.

    Computed chunk by chunk in float64, so the memory is a few megabytes whatever the data set."""
    values = np.asarray(array)
    if values.ndim == 0:
        values = values.reshape(1)
    moments, low, high, finite = _Moments(), np.inf, -np.inf, 0
    channels = values.ndim >= 2 and values.shape[1] <= 64
    per_channel = [_Moments() for _ in range(values.shape[1])] if channels else []
    for chunk in _chunks(values):
        good = chunk[np.isfinite(chunk)]
        finite += good.size
        if good.size:
            moments.add(good)
            low, high = min(low, float(good.min())), max(high, float(good.max()))
        if channels:
            # As before: over every value of the channel (a NaN makes the channel's moments NaN).
            by_channel = np.moveaxis(chunk, 1, 0).reshape(values.shape[1], -1)
            for index, row in enumerate(by_channel):
                per_channel[index].add(row)
    if finite == 0:
        return {"count": int(values.size), "finite": 0}
    edges = np.histogram_bin_edges([], bins=HISTOGRAM_BINS, range=(low, high if high > low else low + 1.0))
    counts = np.zeros(HISTOGRAM_BINS, np.int64)
    for chunk in _chunks(values):
        counts += np.histogram(chunk[np.isfinite(chunk)], bins=edges)[0]
    stats = {
        "count": int(values.size),
        "samples": int(values.shape[0]) if np.ndim(array) else 1,
        "mean": float(moments.mean),
        "std": float(moments.std),
        "min": low,
        "max": high,
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }
    if channels:
        stats["per_channel"] = {"axis": 1, "mean": [float(m.mean) for m in per_channel],
                                "std": [float(m.std) for m in per_channel]}
    return stats


def output_stats(array: np.ndarray) -> dict:
    """The original model's outputs on the validation data: for class scores (2-D, 2..4096 columns) how
    often each class wins, the reference of on-device prediction drift; else value statistics."""
    values = np.asarray(array)
    stats = tensor_stats(values)
    if values.ndim == 2 and 2 <= values.shape[1] <= 4096 and values.shape[0] and np.isfinite(values).all():
        counts = np.bincount(values.argmax(axis=1), minlength=values.shape[1])
        stats["classes"] = {"count": int(values.shape[0]), "frequency": (counts / counts.sum()).round(6).tolist()}
    return stats


def dataset_stats(inputs: dict[str, np.ndarray], source: str, outputs: dict[str, np.ndarray] | None = None,
                  validation: dict[str, np.ndarray] | None = None, output_kinds: dict[str, str] | None = None) -> dict:
    """Statistics per input name (and per output name, of the original model on the validation data).

    With ``validation`` (the validation inputs ``outputs`` were computed on) it also holds the ``drift``
    section the agent's tests compare live traffic with (``agent.drift.reference``); v1 readers ignore it."""
    stats = {"schema": "edgepack.stats/v2" if validation is not None else "edgepack.stats/v1", "source": source,
             "inputs": {name: tensor_stats(a) for name, a in inputs.items()}}
    if outputs:
        stats["outputs"] = {name: output_stats(a) for name, a in outputs.items()}
    if validation is not None:
        from .evaluation import drift_reference

        stats["drift"] = drift_reference(validation, outputs, output_kinds)
    return stats
