"""On-device drift: how far live inputs and predictions are from the data the model was converted with.

The bundle's ``stats/reference.json`` holds, per input, a histogram of the calibration values (20
bins), and per class-score output how often each class won on the validation data. Live traffic is
binned the same way over a sliding window of recent samples, and compared with the population
stability index (PSI = sum over bins of (live - ref) * ln(live / ref)): below 0.1 is usually read
as no change, 0.1-0.25 as moderate, above 0.25 as a significant shift.

Cheap enough for every request on a Raspberry Pi: at most :data:`MAX_VALUES` values of each input
are binned (a fixed stride through the sample), one ``searchsorted`` each; class drift is one argmax
per sample. ``benchmarks/drift.py`` measures it against the model's own latency.
"""

from __future__ import annotations

import collections
import threading

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


class DriftMonitor:
    """Sliding-window drift scores of one loaded version."""

    def __init__(self, reference: dict, input_names: list[str], output_names: list[str], window: int = 500):
        self.window = window
        self.errors = 0
        self._lock = threading.Lock()
        self.inputs: dict[str, tuple[np.ndarray, np.ndarray, _Window]] = {}
        #: input name -> (lowest, highest) calibration value (an update's probation uses it)
        self.ranges: dict[str, tuple[float, float]] = {}
        for name, stats in (reference.get("inputs") or {}).items():
            histogram = stats.get("histogram") if isinstance(stats, dict) else None
            if name in input_names and histogram and len(histogram.get("edges", [])) >= 3:
                edges = np.asarray(histogram["edges"], np.float64)
                counts = np.asarray(histogram.get("counts", []), np.float64)
                if counts.shape != (len(edges) - 1,) or not np.all(np.diff(edges) >= 0):
                    continue  # a malformed reference: no drift score rather than a broken request
                # inner edges only: values below the first or above the last land in the end bins
                self.inputs[name] = (edges[1:-1], counts, _Window(len(counts), window))
                if np.isfinite(edges[[0, -1]]).all():
                    self.ranges[name] = (float(edges[0]), float(edges[-1]))
        self.outputs: dict[str, tuple[np.ndarray, _Window]] = {}
        reference_outputs = list((reference.get("outputs") or {}).values())
        for name, stats in zip(output_names, reference_outputs):
            classes = stats.get("classes") if isinstance(stats, dict) else None
            if classes and classes.get("frequency"):
                frequency = np.asarray(classes["frequency"], np.float64)
                self.outputs[name] = (frequency, _Window(len(frequency), window))

    @property
    def enabled(self) -> bool:
        return bool(self.inputs or self.outputs)

    def safe_observe(self, feeds, outputs) -> None:
        """:meth:`observe`, never failing the request it measures."""
        try:
            self.observe(feeds, outputs)
        except Exception:  # noqa: BLE001 - drift is a measurement; the answer matters more
            self.errors += 1

    def observe(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None) -> None:
        """Bin one run's inputs and predictions (called after the run, on the worker thread)."""
        updates = []
        for name, (inner, _, window) in self.inputs.items():
            array = feeds.get(name)
            if array is None or array.dtype.kind not in "fiu" or not array.size:
                continue
            flat = array.reshape(-1)
            step = max(1, flat.size // (MAX_VALUES * max(1, array.shape[0] if array.ndim else 1)))
            values = flat[::step]
            counts = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(inner) + 1)
            updates.append((window, counts, array.shape[0] if array.ndim else 1))
        for name, (frequency, window) in self.outputs.items():
            scores = (outputs or {}).get(name)
            if scores is None or scores.ndim != 2 or scores.shape[1] != len(frequency):
                continue
            updates.append((window, np.bincount(scores.argmax(axis=1), minlength=len(frequency)), scores.shape[0]))
        with self._lock:
            for window, counts, samples in updates:
                window.add(counts, samples)

    def scores(self) -> dict:
        """PSI per input (``input:NAME``) and per class output (``prediction:NAME``), and the window's
        sample count; None for a score with no samples yet."""
        with self._lock:
            result = {}
            for name, (_, reference, window) in self.inputs.items():
                result[f"input:{name}"] = round(psi(reference, window.total), 4) if window.samples else None
            for name, (frequency, window) in self.outputs.items():
                result[f"prediction:{name}"] = round(psi(frequency, window.total), 4) if window.samples else None
            samples = max((w.samples for *_, w in self.inputs.values()), default=0)
            samples = max([samples] + [w.samples for _, w in self.outputs.values()])
        return {"psi": result, "window_samples": samples}


def monitor_for(model, window: int = 500) -> DriftMonitor | None:
    """The drift monitor of a loaded model, from the reference statistics in its extracted bundle."""
    import json

    path = (model.manifest.get("reference_stats") or "stats/reference.json")
    try:
        reference = json.loads((model.folder / path).read_text())
    except (OSError, ValueError):
        return None
    monitor = DriftMonitor(reference, [s.name for s in model.inputs], [s.name for s in model.outputs], window)
    return monitor if monitor.enabled else None
