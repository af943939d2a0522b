"""The accuracy gate: compare a candidate with the original model, every output and every metric at once."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from edgepack.outputs import (  # noqa: F401 - the gate's names for them
    MAP_THRESHOLD, OUTPUT_KINDS, is_classifier_output, is_probability_map, output_kind, top_margin,
)
from edgepack.profiles import Budgets


#: float64 bytes of each output the gate holds at once
COMPARE_CHUNK_BYTES = 32 << 20


@dataclass
class OutputMetrics:
    """How one output of a candidate compares with the original."""

    name: str
    kind: str = "other"
    cosine: float | None = None
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    top1_agreement: float | None = None
    #: top-1 agreement on the samples the original is confident about (top-1 beats top-2 by a margin)
    confident_agreement: float | None = None
    confident_samples: int | None = None
    #: embeddings: how often a sample's nearest neighbour in the validation set stays the same
    neighbour_agreement: float | None = None
    #: regression: mean |error| relative to the mean |original output|
    relative_error: float | None = None
    exact_agreement: float | None = None
    #: maps: intersection over union of the thresholded maps, over every pixel of the validation set
    map_iou: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class GateResult:
    """Metrics of one candidate and the reasons it fails the budget (empty when it passes)."""

    outputs: list[OutputMetrics]
    accuracy: float | None = None
    reference_accuracy: float | None = None
    failures: list[str] = field(default_factory=list)
    #: whether a sample's outputs alone equal its outputs inside a batch (None: not checked)
    batch_invariant: bool | None = None
    batch_deviation: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def agreement(self) -> float | None:
        """The worst agreement of any output: top-1 for class scores, nearest neighbour for embeddings,
        exact for labels."""
        values = [v for m in self.outputs for v in (m.top1_agreement, m.neighbour_agreement, m.exact_agreement)
                  if v is not None]
        return min(values) if values else None

    @property
    def confident_agreement(self) -> float | None:
        values = [m.confident_agreement for m in self.outputs if m.confident_agreement is not None]
        return min(values) if values else None

    @property
    def cosine(self) -> float | None:
        values = [m.cosine for m in self.outputs if m.cosine is not None]
        return min(values) if values else None

    def to_dict(self) -> dict:
        data = {"outputs": [m.to_dict() for m in self.outputs], "passed": self.passed, "failures": self.failures}
        if self.agreement is not None:
            data["agreement"] = self.agreement
        if self.confident_agreement is not None:
            data["confident_agreement"] = self.confident_agreement
        if self.batch_invariant is not None:
            data["batch_invariant"] = self.batch_invariant
            finite = np.isfinite(self.batch_deviation)
            data["batch_deviation"] = float(f"{self.batch_deviation:.3g}") if finite else None
        if self.accuracy is not None:
            data["accuracy"] = self.accuracy
            data["reference_accuracy"] = self.reference_accuracy
        return data


#: nearest neighbours are searched among at most this many validation samples (memory grows as N^2)
NEIGHBOUR_SAMPLES = 2000


def similarities(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row with every other row (the diagonal is -inf)."""
    rows = np.asarray(embeddings, dtype=np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity


def compare_output(name: str, reference: np.ndarray, candidate: np.ndarray, kind: str | None = None,
                   confident_margin: float = 1.0, neighbour_margin: float = 0.05) -> OutputMetrics:
    """Cosine, errors and the metric that fits what the output is (the reference is reshaped when only
    its layout differs); ``kind`` declares what it is, else it is detected (``output_kind``)."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape and reference.size == candidate.size:
        reference = reference.reshape(candidate.shape)
    metrics = OutputMetrics(name, output_kind(reference, kind))
    if reference.shape != candidate.shape:
        metrics.exact_agreement = 0.0
        return metrics
    if candidate.dtype.kind in "iub" or candidate.dtype.kind in "USO":
        metrics.kind = "labels"
        metrics.exact_agreement = float(np.mean(reference.astype(candidate.dtype) == candidate)) if reference.size else 1.0
        return metrics
    rows = len(reference) if reference.ndim else 1
    flat_ref, flat_cand = reference.reshape(rows, -1), candidate.reshape(rows, -1)
    # In chunks of samples: float64 copies of a few hundred 640x640 maps are gigabytes.
    step = max(1, COMPARE_CHUNK_BYTES // max(1, flat_ref.shape[1] * 8))
    finite, worst, total_error, total_ref = True, 0.0, 0.0, 0.0
    dot = ref_power = cand_power = 0.0
    inter = union = 0
    cosines = []
    for start in range(0, rows, step):
        ref = flat_ref[start:start + step].astype(np.float64)
        cand = flat_cand[start:start + step].astype(np.float64)
        finite = finite and bool(np.isfinite(cand).all())
        if not finite:
            break
        diff = np.abs(ref - cand)
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        total_error += float(diff.sum())
        total_ref += float(np.abs(ref).sum())
        if metrics.kind == "map":
            dot, ref_power, cand_power = dot + float((ref * cand).sum()), ref_power + float((ref**2).sum()), cand_power + float((cand**2).sum())
            on, got = ref > MAP_THRESHOLD, cand > MAP_THRESHOLD
            inter, union = inter + int(np.logical_and(on, got).sum()), union + int(np.logical_or(on, got).sum())
        elif metrics.kind != "regression":
            num = (ref * cand).sum(axis=1)
            den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
            # Samples whose reference and candidate are both all-zero agree perfectly.
            cosines.append(np.where(den > 0, num / np.where(den > 0, den, 1),
                                    np.where(np.abs(ref).sum(1) + np.abs(cand).sum(1) == 0, 1.0, 0.0)))
    values = max(1, flat_ref.size)
    metrics.max_abs_error = worst if finite else float("inf")
    metrics.mean_abs_error = total_error / values if finite else float("inf")
    if metrics.kind == "regression":
        # One number per sample: a per-sample cosine would only compare signs.
        scale = total_ref / values
        mean = total_error / values
        metrics.relative_error = (mean / scale if scale > 0 else mean) if finite else float("inf")
        return metrics
    if metrics.kind == "map":
        # A map is judged over all its pixels at once: per sample, an image without any text has a map
        # of near-zeros whose cosine is noise (fp32 itself scored 0.97 that way on photos of text).
        norm = float(np.sqrt(ref_power) * np.sqrt(cand_power))
        metrics.cosine = (dot / norm if norm > 0 else float(total_error == 0)) if finite else 0.0
        metrics.map_iou = (inter / union if union else 1.0) if finite else 0.0
        return metrics
    metrics.cosine = float(np.mean(np.concatenate(cosines))) if finite and cosines else 0.0
    if metrics.kind == "embedding":
        ref, cand = flat_ref.astype(np.float64), flat_cand.astype(np.float64)  # [N, D] vectors: small
        if len(ref) > 2:
            # The embedding's "answer" is its nearest neighbour among the validation samples; a sample
            # whose two nearest neighbours are almost equally near is a near-tie, as for class scores.
            original = similarities(ref[:NEIGHBOUR_SAMPLES])
            agree = original.argmax(axis=1) == similarities(cand[:NEIGHBOUR_SAMPLES]).argmax(axis=1)
            metrics.neighbour_agreement = float(np.mean(agree)) if finite else 0.0
            top = np.sort(original, axis=1)[:, -2:]
            confident = top[:, 1] - top[:, 0] > neighbour_margin
            metrics.confident_samples = int(confident.sum())
            if confident.any():
                metrics.confident_agreement = float(np.mean(agree[confident])) if finite else 0.0
    elif metrics.kind == "classes" and is_classifier_output(reference):
        agree = reference.argmax(axis=1) == candidate.argmax(axis=1)
        metrics.top1_agreement = float(np.mean(agree)) if finite else 0.0
        confident = top_margin(reference) > confident_margin
        metrics.confident_samples = int(confident.sum())
        if confident.any():
            metrics.confident_agreement = float(np.mean(agree[confident])) if finite else 0.0
    return metrics


def evaluate(reference_outputs: list[np.ndarray], candidate_outputs: list[np.ndarray], output_names: list[str],
             budgets: Budgets, min_agreement: float | None = None, labels: np.ndarray | None = None,
             kinds: dict[str, str] | None = None) -> GateResult:
    """Compare every output; list every budget miss at once. ``kinds`` declares what outputs are."""
    min_agreement = budgets.min_agreement if min_agreement is None else min_agreement
    kinds = kinds or {}
    metrics = [compare_output(name, ref, cand, kinds.get(name), budgets.confident_margin, budgets.neighbour_margin)
               for name, ref, cand in zip(output_names, reference_outputs, candidate_outputs)]
    result = GateResult(metrics)
    for m in metrics:
        if m.max_abs_error is not None and not np.isfinite(m.max_abs_error):
            result.failures.append(f"{m.name}: non-finite outputs (NaN/Inf)")
        if m.cosine is not None and m.cosine < budgets.min_cosine:
            result.failures.append(f"{m.name}: cosine {m.cosine:.4f} < {budgets.min_cosine}")
        margin = budgets.neighbour_margin if m.kind == "embedding" else budgets.confident_margin
        confident = (f"agreement on confident samples (margin > {margin:g})", m.confident_agreement)
        overall = m.top1_agreement if m.top1_agreement is not None else m.neighbour_agreement
        if m.confident_samples == 0 and overall is not None:
            # No answer clears the margin (e.g. sigmoid or multi-label scores): every answer is then
            # held to the confident budget rather than none.
            confident = (f"agreement (no sample has a margin > {margin:g}, so every one counts as confident)", overall)
        budgeted = (("top-1 agreement", m.top1_agreement, min_agreement),
                    (*confident, budgets.min_confident_agreement),
                    ("nearest-neighbour agreement", m.neighbour_agreement, budgets.min_neighbour_agreement),
                    # Labels have no margin to tell near-ties from confident answers: their own budget.
                    ("agreement", m.exact_agreement, budgets.min_label_agreement))
        for label, value, limit in budgeted:
            if value is not None and limit is not None and value < limit:
                result.failures.append(f"{m.name}: {label} {value:.2%} < {limit:.2%}")
        if m.map_iou is not None and m.map_iou < budgets.min_map_iou:
            result.failures.append(f"{m.name}: map IoU (pixels > {MAP_THRESHOLD:g}) {m.map_iou:.4f} < {budgets.min_map_iou}")
        if m.relative_error is not None and m.relative_error > budgets.max_relative_error:
            result.failures.append(f"{m.name}: relative error {m.relative_error:.2%} > {budgets.max_relative_error:.2%}")
    if labels is not None:
        scores = _prediction_output(candidate_outputs)
        ref_scores = _prediction_output(reference_outputs)
        if scores is not None and ref_scores is not None:
            result.accuracy = float(np.mean(scores == labels.reshape(-1)))
            result.reference_accuracy = float(np.mean(ref_scores == labels.reshape(-1)))
            drop = result.reference_accuracy - result.accuracy
            if drop > budgets.max_accuracy_drop:
                result.failures.append(
                    f"accuracy {result.accuracy:.2%} is {drop:.2%} below the original's {result.reference_accuracy:.2%}"
                )
    return result


def _prediction_output(outputs: list[np.ndarray]) -> np.ndarray | None:
    """Predicted class per sample: an integer label output, else the argmax of the first score output."""
    for array in outputs:
        if np.asarray(array).dtype.kind in "iu" and np.asarray(array).ndim <= 2:
            return np.asarray(array).reshape(len(array), -1)[:, 0]
    for array in outputs:
        if is_classifier_output(np.asarray(array)):
            return np.asarray(array).argmax(axis=1)
    return None


@dataclass
class Latency:
    """Latency of single-sample inference on this host."""

    p50_ms: float
    p95_ms: float
    runs: int

    def to_dict(self) -> dict:
        return {"p50_ms": round(self.p50_ms, 4), "p95_ms": round(self.p95_ms, 4), "runs": self.runs, "batch": 1}


def measure_latency(run, feeds: dict[str, np.ndarray], min_runs: int = 20, budget_s: float = 0.6) -> Latency:
    """Time ``run(feeds)`` after a warm-up: at least ``min_runs`` runs or ``budget_s`` seconds."""
    for _ in range(3):
        run(feeds)
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < 2000):
        start = time.perf_counter()
        run(feeds)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return Latency(statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.95))], len(times))


#: a candidate counts as slower (or faster) than fp32 only beyond this margin outside the noise
LATENCY_MARGIN = 0.05


@dataclass
class LatencyRatio:
    """Candidate latency / fp32 latency, measured interleaved, with a 95% confidence interval."""

    ratio: float
    low: float
    high: float
    rounds: int

    def slower_than(self, limit: float) -> bool:
        """Slower than ``limit`` beyond the margin, even at the low end of the interval."""
        return self.low > limit * (1 + LATENCY_MARGIN)

    def describe(self) -> str:
        return f"{self.ratio:.2f}x (95% CI {self.low:.2f}-{self.high:.2f}, {self.rounds} rounds)"


def compare_latency(run, baseline, feeds: dict[str, np.ndarray], min_rounds: int = 9, per_round: int = 7,
                    max_seconds: float = 3.0, halfwidth: float = 0.02) -> LatencyRatio:
    """Time ``run`` against ``baseline`` in one loop: each round alternates single calls of the two and
    keeps the ratio of their fastest calls, so load on the machine hits both alike. Rounds go on until
    the 95% interval of the median ratio is within ``halfwidth`` (relative) or ``max_seconds`` pass
    (at least 3 rounds; a slow model gets a wider interval rather than minutes of timing)."""
    for _ in range(3):
        run(feeds)
        baseline(feeds)
    ratios: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while True:
        mine, theirs = [], []
        for index in range(per_round):
            # Alternate which goes first, so neither always runs on a cache the other warmed.
            for call, into in ((run, mine), (baseline, theirs)) if index % 2 == 0 else ((baseline, theirs), (run, mine)):
                started = time.perf_counter()
                call(feeds)
                into.append(time.perf_counter() - started)
        # The fastest call of each: noise from other load only ever adds time, so the minimum of a few
        # calls is the least disturbed estimate of what each model costs.
        ratios.append(min(mine) / min(theirs))
        out_of_time = time.perf_counter() > deadline
        if len(ratios) >= min_rounds or (out_of_time and len(ratios) >= 3):
            ordered = sorted(ratios)
            n = len(ordered)
            # Order-statistic interval of the median (normal approximation of the binomial).
            spread = 0.98 * n ** 0.5
            low, high = ordered[max(0, int(n / 2 - spread))], ordered[min(n - 1, int(n / 2 + spread))]
            middle = statistics.median(ordered)
            if (high - low) / 2 <= halfwidth * middle or out_of_time:
                return LatencyRatio(middle, low, high, n)
