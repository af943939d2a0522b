"""Sliding-window drift scores of one loaded version, with p-values and a false-alarm rate.

Each input and output with a reference gets one *score*: its features (``agent.drift.features``) over
the last ``window`` samples, each tested against the reference with Kolmogorov–Smirnov, and for class
scores the predicted classes with a G-test (rare classes pooled). A score's p-value is the smallest of
its tests times their number (Bonferroni); the model's false-alarm rate per window is split evenly over
its scores, so on traffic like the validation data at most that share of windows alarms. No verdict is
given below ``min_samples`` samples.

Bundles made before these references existed keep what they have: per-input PSI over a histogram
(alarming above ``psi_threshold``) and the G-test on the validation class frequencies.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .features import as_feature, input_features, softmax_confidence, unit_rows
from .psi import HistogramScore
from .reference import FALSE_ALARM_RATE
from .stattests import g_test, ks_test

#: the most recent samples a score's tests look at (a longer drift_window still slides, but sorting more
#: on every check would cost the event loop more than it tells)
MAX_TESTED = 2000
#: the false-alarm rate a reference or a config may set, at most
MAX_FALSE_ALARM_RATE = 0.5
#: the most drift may add to the model's own run time (runs beyond it are not observed) ...
COST_SHARE = 0.05
#: ... plus this share of one core's wall time, so that a model much faster than its drift features
#: (a small scikit-learn pipeline) is still watched at hundreds of requests a second
WALL_SHARE = 0.01


class _Ring:
    """The last ``size`` rows of a [*, width] stream."""

    def __init__(self, size: int, width: int, dtype=np.float64):
        self.data = np.zeros((size, width), dtype)
        self.count = 0

    def add(self, rows: np.ndarray) -> None:
        size = len(self.data)
        rows = rows[-size:]
        start = self.count % size
        end = start + len(rows)
        if end <= size:
            self.data[start:end] = rows
        else:
            self.data[start:] = rows[:size - start]
            self.data[:end - size] = rows[size - start:]
        self.count += len(rows)

    def values(self) -> np.ndarray:
        return self.data[:min(self.count, len(self.data))].copy()

    @property
    def samples(self) -> int:
        return min(self.count, len(self.data))


class _Score:
    """One tensor's tests: K-S per feature against sorted reference values, and optionally a G-test
    of predicted classes against reference class counts."""

    def __init__(self, names: list[str], quantiles: list, count: int, window: int, extract,
                 classes: list | None = None, classify=None):
        count = float(count)
        if not np.isfinite(count):
            raise ValueError("count is not a number")
        self.names, self.count, self.extract, self.classify = [str(n) for n in names], max(1, int(count)), extract, classify
        # Back to float32, where the 9 stored digits are exact: the live features are float32 too.
        self.quantiles = [np.sort(as_feature(np.asarray(q, np.float64).reshape(-1))) for q in quantiles]
        if len(self.quantiles) != len(self.names) or any(not len(q) or not np.isfinite(q).all() for q in self.quantiles):
            raise ValueError("one finite quantile list per feature is needed")
        window = min(window, MAX_TESTED)
        self.rows = _Ring(window, len(names)) if names else None
        self.reference_classes = np.asarray(classes, np.float64).reshape(-1) if classes is not None else None
        if self.reference_classes is not None and (len(self.reference_classes) < 2 or
                                                   not np.isfinite(self.reference_classes).all()):
            raise ValueError("class counts are malformed")
        self.classes = _Ring(window, 1, np.int64) if classes is not None else None

    @property
    def tests(self) -> int:
        return len(self.names) + (self.classes is not None)

    @property
    def samples(self) -> int:
        return (self.rows or self.classes).samples

    def prepare(self, tensor: np.ndarray):
        """The rows (and classes) of one run, computed outside the lock; None where the tensor does not
        fit the reference (another width: counted, never a broken request)."""
        rows = self.extract(tensor) if self.rows is not None else None
        if rows is not None:
            rows = as_feature(rows)
            if rows.ndim != 2 or rows.shape[1] != len(self.names):
                rows = None
        classes = self.classify(tensor) if self.classes is not None else None
        return rows, classes

    def add(self, prepared) -> None:
        rows, classes = prepared
        if rows is not None:
            self.rows.add(rows)
        if classes is not None:
            self.classes.add(classes.reshape(-1, 1))

    def snapshot(self):
        return (self.rows.values() if self.rows is not None else None,
                self.classes.values() if self.classes is not None else None)

    def result(self, snapshot) -> dict:
        rows, classes = snapshot
        worst = {"p": 1.0, "feature": None, "statistic": 0.0, "test": None}
        for index, name in enumerate(self.names):
            statistic, p = ks_test(self.quantiles[index], self.count, rows[:, index])
            if p < worst["p"] or worst["feature"] is None:
                worst = {"p": p, "feature": name, "statistic": statistic, "test": "ks"}
        if classes is not None:
            live = np.bincount(classes[:, 0], minlength=len(self.reference_classes))[:len(self.reference_classes)]
            statistic, p, categories = g_test(self.reference_classes, live)
            if p < worst["p"] or worst["feature"] is None:
                worst = {"p": p, "feature": "class", "statistic": statistic, "test": "g", "categories": categories}
        worst["p"] = min(1.0, worst["p"] * self.tests)
        return worst


def _class_ids(width: int):
    def classify(scores):
        if scores.ndim != 2 or scores.shape[1] != width:
            return None
        return scores.argmax(axis=1)
    return classify


def _output_score(reference, window: int) -> _Score | None:
    if not isinstance(reference, dict):
        return None
    kind, count = reference.get("kind"), reference.get("count", 0)
    if kind == "classes":
        classes = reference.get("classes")
        width = len(classes)
        probabilities = bool(reference.get("probabilities"))

        def confidence(scores):
            if scores.ndim != 2 or scores.shape[1] != width:
                return None
            return softmax_confidence(scores, probabilities)[:, None]
        return _Score(["confidence"], [reference["confidence"]], count, window, confidence, classes, _class_ids(width))
    if kind == "embedding":
        centroid = np.asarray(reference["centroid"], np.float64)
        if centroid.ndim != 1 or not len(centroid) or not np.isfinite(centroid).all():
            raise ValueError("the embedding centroid is malformed")

        def cosine(rows):
            rows = rows.reshape(len(rows), -1)
            return None if rows.shape[1] != len(centroid) else (unit_rows(rows) @ centroid)[:, None]
        return _Score(["cosine"], [reference["cosine"]], count, window, cosine)
    if kind == "regression":
        width = len(reference["features"])

        def values(rows):
            rows = rows.reshape(len(rows), -1)
            return None if rows.shape[1] != width else rows.astype(np.float64)
        return _Score(reference["features"], reference["quantiles"], count, window, values)
    if kind == "other":
        return _Score(reference["features"], reference["quantiles"], count, window,
                      lambda rows: input_features("values", None, rows))
    return None


def _items(section) -> list:
    return list(section.items()) if isinstance(section, dict) else []


def _input_score(entry, window: int) -> _Score | None:
    if not isinstance(entry, dict) or not entry.get("features"):
        return None
    kind, layout = entry.get("kind"), entry.get("layout")
    if kind not in ("image", "features", "values") or (kind == "image" and layout not in ("nchw", "nhwc", "nhw")):
        raise ValueError(f"unknown input kind {kind!r}")
    return _Score(entry["features"], entry["quantiles"], entry.get("count", 0), window,
                  lambda array: input_features(kind, layout, array))


def _legacy_class_score(stats, window: int) -> _Score | None:
    classes = stats.get("classes") if isinstance(stats, dict) else None
    if not isinstance(classes, dict) or not classes.get("frequency"):
        return None
    counts = np.round(np.asarray(classes["frequency"], np.float64) * float(classes.get("count", 0)))
    return _Score([], [], int(counts.sum()), window, None, counts.tolist(), _class_ids(len(counts)))


class DriftMonitor:
    """Sliding-window drift scores of one loaded version (see the module docstring)."""

    def __init__(self, reference: dict, input_names: list[str], output_names: list[str], window: int = 500,
                 false_alarm_rate: float | None = None, min_samples: int = 50, psi_threshold: float = 0.25):
        self.window, self.errors, self.psi_threshold = window, 0, psi_threshold
        self.min_samples = max(1, min(min_samples, window))
        self._lock = threading.Lock()
        self._credit_lock = threading.Lock()
        self._credit = self._cost = 0.0
        self._last = time.monotonic()
        self.observed = self.skipped = 0
        self.spent = 0.0  # seconds spent observing, all runs together (what the budget bounds)
        #: the scores last worked out (telemetry reads them rather than sorting on the event loop)
        self.latest: dict | None = None
        section = reference.get("drift") if isinstance(reference.get("drift"), dict) else {}
        rate = false_alarm_rate if false_alarm_rate is not None else section.get("false_alarm_rate")
        try:
            rate = float(rate) if rate is not None else FALSE_ALARM_RATE
        except (TypeError, ValueError):
            rate = FALSE_ALARM_RATE
        # A bundle saying 0 or less would never alarm, 1 or more always: neither is a drift monitor.
        self.false_alarm_rate = rate if 0 < rate <= MAX_FALSE_ALARM_RATE else FALSE_ALARM_RATE
        #: entries of the reference that could not be used (malformed): skipped, never fatal
        self.skipped_entries: list[str] = []
        #: label -> (tensor name, is input, _Score)
        self.scores_: dict[str, tuple[str, bool, _Score]] = {}
        for name, entry in _items(section.get("inputs")):
            if name in input_names:
                self._add(f"input:{name}", name, True, lambda entry=entry: _input_score(entry, window))
        for name, entry in _items(section.get("outputs")):
            if name in output_names:
                self._add(f"prediction:{name}", name, False, lambda entry=entry: _output_score(entry, window))
        # What older bundles have: input histograms (PSI) and validation class frequencies. Not where
        # the converter had no data: its statistics of random inputs say nothing about real traffic.
        self.histograms: dict[str, HistogramScore] = {}
        #: input name -> (lowest, highest) calibration value (an update's probation uses it)
        self.ranges: dict[str, tuple[float, float]] = {}
        if str(reference.get("source", "")).startswith("random"):
            return
        for name, stats in _items(reference.get("inputs")):
            try:
                score = HistogramScore.of(stats, window) if name in input_names else None
            except (TypeError, ValueError, KeyError, AttributeError):
                self.skipped_entries.append(f"input:{name}")
                continue
            if score is not None:
                self.histograms[name] = score
                if score.range is not None:
                    self.ranges[name] = score.range
        outputs = reference.get("outputs")
        for name, stats in zip(output_names, outputs.values()) if isinstance(outputs, dict) else ():
            label = f"prediction:{name}"
            if label not in self.scores_:
                self._add(label, name, False, lambda stats=stats: _legacy_class_score(stats, window))

    def _add(self, label: str, name: str, is_input: bool, build) -> None:
        try:
            score = build()
        except (TypeError, ValueError, KeyError, AttributeError, IndexError):
            self.skipped_entries.append(label)
            return
        if score is not None:
            self.scores_[label] = (name, is_input, score)

    @property
    def enabled(self) -> bool:
        return bool(self.scores_ or self.histograms)

    @property
    def alpha(self) -> float:
        """The p-value under which one score alarms: the false-alarm rate split over the scores."""
        return self.false_alarm_rate / max(1, len(self.scores_))

    def safe_observe(self, feeds, outputs, run_seconds: float | None = None) -> None:
        """:meth:`observe`, never failing the request it measures. With ``run_seconds`` (the model's own
        time for this run) drift costs at most :data:`COST_SHARE` of the model's time plus
        :data:`WALL_SHARE` of wall time: beyond that, an even subsample of runs is observed
        (``observed`` / ``skipped``)."""
        if run_seconds is not None:
            with self._credit_lock:
                now = time.monotonic()
                earned = run_seconds * COST_SHARE + (now - self._last) * WALL_SHARE
                self._last = now
                # Capped at a few observations, so a quiet spell does not buy a burst.
                self._credit = min(self._credit + earned, 4 * self._cost + 1e-3)
                if self._credit < self._cost:
                    self.skipped += 1
                    return
        started = time.perf_counter()
        try:
            self.observe(feeds, outputs)
        except Exception:  # noqa: BLE001 - drift is a measurement; the answer matters more
            self.errors += 1
        spent = time.perf_counter() - started
        with self._credit_lock:
            self.observed += 1
            self.spent += spent
            if run_seconds is not None:
                self._credit -= spent
            self._cost = spent if self.observed == 1 else 0.8 * self._cost + 0.2 * spent

    def observe(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None) -> None:
        """Add one run's inputs and predictions (called after the run, on the worker thread)."""
        updates = []
        for label, (name, is_input, score) in self.scores_.items():
            tensor = (feeds if is_input else (outputs or {})).get(name)
            if tensor is None or not getattr(tensor, "ndim", 0) or not len(tensor) or tensor.dtype.kind not in "fiub":
                continue
            rows, classes = score.prepare(np.asarray(tensor))
            if (score.rows is None or rows is not None) and (score.classes is None or classes is not None):
                updates.append((score, (rows, classes)))
        for name, histogram in self.histograms.items():
            counts = histogram.counts(feeds.get(name))
            if counts is not None:
                updates.append((histogram, counts))
        with self._lock:
            for score, prepared in updates:
                score.add(prepared)

    def scores(self) -> dict:
        """Every score's test (``test``, ``p``, ``statistic``, the worst ``feature``, ``samples``,
        ``alarm``), PSI where an input histogram exists, the window's sample count and the alarm level."""
        with self._lock:
            snapshots = {label: (score, score.snapshot()) for label, (_, _, score) in self.scores_.items()}
            histograms = {name: (h, h.window.total.copy(), h.window.samples) for name, h in self.histograms.items()}
        alpha, tests, psi_scores = self.alpha, {}, {}
        for label, (score, snapshot) in snapshots.items():
            samples = len(snapshot[0] if snapshot[0] is not None else snapshot[1])
            if samples == 0:
                tests[label] = None
                continue
            try:
                result = score.result(snapshot)
            except Exception:  # noqa: BLE001 - one bad score must not cost the others (or telemetry)
                self.errors += 1
                tests[label] = None
                continue
            result.update(samples=samples, reference=score.count, p=float(f"{result['p']:.4g}"),
                          statistic=round(result["statistic"], 4),
                          alarm=samples >= self.min_samples and result["p"] < alpha)
            tests[label] = result
        for name, (histogram, total, samples) in histograms.items():
            label = f"input:{name}"
            value = histogram.psi(total) if samples else None
            psi_scores[label] = value
            if label not in tests:  # an older bundle: PSI is this input's only score
                tests[label] = None if value is None else {
                    "test": "psi", "psi": value, "threshold": self.psi_threshold, "samples": samples,
                    "alarm": samples >= min(100, self.window) and value > self.psi_threshold}
        counts = [t["samples"] for t in tests.values() if t]
        self.latest = {"tests": tests, "psi": psi_scores, "window_samples": max(counts, default=0),
                "min_samples": self.min_samples, "false_alarm_rate": self.false_alarm_rate, "alpha": alpha,
                "errors": self.errors, "skipped": self.skipped_entries,
                # the share of runs drift looked at (below 1 when observing costs more than COST_SHARE)
                "observed_share": round(self.observed / max(1, self.observed + self.skipped), 4)}
        return self.latest


def monitor_for(model, window: int = 500, false_alarm_rate: float | None = None, min_samples: int = 50,
                psi_threshold: float = 0.25) -> DriftMonitor | None:
    """The drift monitor of a loaded model, from the reference statistics in its extracted bundle."""
    import json

    path = (model.manifest.get("reference_stats") or "stats/reference.json")
    try:
        reference = json.loads((model.folder / path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(reference, dict):
        return None
    try:
        monitor = DriftMonitor(reference, [s.name for s in model.inputs], [s.name for s in model.outputs], window,
                               false_alarm_rate, min_samples, psi_threshold)
    except Exception:  # noqa: BLE001 - drift is a measurement: a bad reference must not stop the model loading
        return None
    return monitor if monitor.enabled else None
