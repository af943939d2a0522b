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
        from agent.drift.reference import drift_reference

        stats["drift"] = drift_reference(validation, outputs, output_kinds)
    return stats
