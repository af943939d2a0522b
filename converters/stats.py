"""Reference statistics of the calibration data, stored in the bundle for on-device drift detection."""

from __future__ import annotations

import numpy as np

HISTOGRAM_BINS = 20


def tensor_stats(array: np.ndarray) -> dict:
    """Mean, std, min, max and a histogram of all values; per-channel mean/std for axis 1 when small."""
    values = np.asarray(array, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"count": int(values.size), "finite": 0}
    low, high = float(finite.min()), float(finite.max())
    counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS, range=(low, high if high > low else low + 1.0))
    stats = {
        "count": int(values.size),
        "samples": int(values.shape[0]) if values.ndim else 1,
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "min": low,
        "max": high,
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }
    if values.ndim >= 2 and values.shape[1] <= 64:
        per_channel = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1)
        stats["per_channel"] = {"axis": 1, "mean": per_channel.mean(axis=1).tolist(), "std": per_channel.std(axis=1).tolist()}
    return stats


def dataset_stats(inputs: dict[str, np.ndarray], source: str) -> dict:
    """Statistics per input name."""
    return {"schema": "edgepack.stats/v1", "source": source, "inputs": {name: tensor_stats(a) for name, a in inputs.items()}}
