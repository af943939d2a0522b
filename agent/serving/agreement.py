"""How often a candidate agrees with the active version, accumulated request by request (shadow).

The numbers are the accuracy gate's (``converters.gate.compare_output``), kept as running sums so
memory stays flat however long the shadow runs: top-1 and confident agreement for class scores,
per-sample cosine for embeddings and other tensors, relative error for a regression, IoU of the
thresholded map (and the map's cosine over all its pixels) for probability maps, exact agreement for
labels. Over the same inputs they equal the gate's figures, except that a candidate output with NaN or
Inf counts as a disagreement of that request's samples (the gate fails the whole set) and embeddings
get no nearest-neighbour agreement (it needs every sample at once).
"""

from __future__ import annotations

import numpy as np

from edgepack.outputs import MAP_THRESHOLD, is_classifier_output, output_kind, top_margin


class OutputAgreement:
    """Running comparison of one output."""

    def __init__(self, name: str, confident_margin: float = 1.0):
        self.name = name
        self.kind: str | None = None
        self.confident_margin = confident_margin
        self.samples = 0
        self.values = 0
        self.nonfinite = 0  # samples whose candidate output held NaN or Inf
        self.mismatched = 0  # samples whose candidate output had another shape
        self.agree = 0
        self.confident = 0
        self.confident_agree = 0
        self.cosine_sum = 0.0
        self.error_sum = 0.0
        self.reference_sum = 0.0
        self.worst = 0.0
        self.dot = self.ref_power = self.cand_power = 0.0
        self.inter = self.union = 0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Add one request's outputs (sample axis first)."""
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if self.kind is None:
            self.kind = output_kind(reference)  # fixed by the first request: one kind for the whole run
        rows = len(reference) if reference.ndim else 1
        if reference.shape != candidate.shape:
            if reference.size != candidate.size:  # every sample disagrees, and its values count
                self.samples += rows
                self.mismatched += rows
                self.values += reference.size
                if self.kind == "map":
                    self.union += int((reference > MAP_THRESHOLD).sum())
                return
            reference = reference.reshape(candidate.shape)
        self.samples += rows
        if self.kind == "labels" or candidate.dtype.kind in "iubUSO":
            self.agree += int(np.sum(reference.astype(candidate.dtype) == candidate)) if reference.size else 0
            self.values += reference.size
            return
        ref = reference.reshape(rows, -1).astype(np.float64)
        cand = candidate.reshape(rows, -1).astype(np.float64)
        finite = np.isfinite(cand).all(axis=1)
        if not finite.all():
            self.nonfinite += int((~finite).sum())
            ref, cand = ref[finite], cand[finite]  # the others count as disagreements (nothing added)
            if self.kind == "map":  # a map's sums are over pixels: the broken samples' pixels still count
                self.values += int((~finite).sum()) * reference[0].size
                self.union += int((reference.reshape(rows, -1)[~finite] > MAP_THRESHOLD).sum())
        diff = np.abs(ref - cand)
        self.values += diff.size
        self.error_sum += float(diff.sum())
        self.reference_sum += float(np.abs(ref).sum())
        if diff.size:
            self.worst = max(self.worst, float(diff.max()))
        if self.kind == "regression":
            return
        if self.kind == "map":
            self.dot += float((ref * cand).sum())
            self.ref_power += float((ref ** 2).sum())
            self.cand_power += float((cand ** 2).sum())
            on, got = ref > MAP_THRESHOLD, cand > MAP_THRESHOLD
            self.inter += int(np.logical_and(on, got).sum())
            self.union += int(np.logical_or(on, got).sum())
            return
        num = (ref * cand).sum(axis=1)
        den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        both_zero = np.abs(ref).sum(1) + np.abs(cand).sum(1) == 0
        self.cosine_sum += float(np.where(den > 0, num / np.where(den > 0, den, 1), np.where(both_zero, 1.0, 0.0)).sum())
        if self.kind == "classes" and is_classifier_output(reference) and len(ref):
            agree = ref.argmax(axis=1) == cand.argmax(axis=1)
            self.agree += int(agree.sum())
            confident = top_margin(ref) > self.confident_margin
            self.confident += int(confident.sum())
            self.confident_agree += int(agree[confident].sum())
            if not finite.all():  # a broken sample the active version was confident about is a miss
                self.confident += int((top_margin(reference.reshape(rows, -1)[~finite]) > self.confident_margin).sum())

    def summary(self) -> dict:
        """The figures so far (None where there is nothing to compare yet)."""
        out: dict = {"kind": self.kind, "samples": self.samples}
        if self.nonfinite:
            out["nonfinite_samples"] = self.nonfinite
        if self.mismatched:
            out["mismatched_samples"] = self.mismatched
        if not self.samples:
            return out
        if self.kind == "labels":
            out["exact_agreement"] = self.agree / self.values if self.values else 0.0
            return out
        out["max_abs_error"] = self.worst if self.nonfinite == 0 else float("inf")
        out["mean_abs_error"] = (self.error_sum / self.values if self.values else None) if self.nonfinite == 0 \
            else float("inf")
        if self.kind == "regression":
            mean = self.error_sum / self.values if self.values else 0.0
            scale = self.reference_sum / self.values if self.values else 0.0
            out["relative_error"] = (mean / scale if scale > 0 else mean) if not (self.nonfinite or self.mismatched) \
                else float("inf")
            return out
        if self.kind == "map":
            norm = float(np.sqrt(self.ref_power) * np.sqrt(self.cand_power))
            out["cosine"] = (self.dot / norm if norm > 0 else float(self.error_sum == 0)) if not self.nonfinite else 0.0
            out["map_iou"] = self.inter / self.union if self.union else 1.0
            return out
        out["cosine"] = self.cosine_sum / self.samples
        if self.kind == "classes":
            out["top1_agreement"] = self.agree / self.samples
            out["confident_samples"] = self.confident
            if self.confident:
                out["confident_agreement"] = self.confident_agree / self.confident
        return out


class Agreement:
    """Running comparison of every output of a candidate with the active version's."""

    def __init__(self, names: list[str], confident_margin: float = 1.0):
        """``names``: the active version's outputs (one the candidate lacks counts as disagreeing)."""
        self.outputs = {name: OutputAgreement(name, confident_margin) for name in names}

    def update(self, reference: dict, candidate: dict) -> None:
        for name, output in self.outputs.items():
            if name in reference:
                if name in candidate:
                    output.update(reference[name], candidate[name])
                else:  # the candidate lacks the output: every sample disagrees
                    rows = len(reference[name]) if np.ndim(reference[name]) else 1
                    output.samples += rows
                    output.mismatched += rows

    def summary(self) -> dict:
        """Output name -> its figures, and the headline ``agreement``: the worst top-1 / exact agreement,
        else the worst map IoU, else the worst cosine (None before any comparison)."""
        outputs = {name: output.summary() for name, output in self.outputs.items()}
        return {"outputs": outputs, "agreement": headline(outputs)}


def headline(outputs: dict) -> float | None:
    """One number for a candidate's agreement (what a rollout criterion and a chart use)."""
    for keys in (("top1_agreement", "exact_agreement"), ("map_iou",), ("cosine",)):
        values = [o[key] for o in outputs.values() for key in keys if o.get(key) is not None]
        if values:
            return min(values)
    regression = [o["relative_error"] for o in outputs.values() if o.get("relative_error") is not None]
    if regression:
        return max(0.0, 1.0 - max(regression))
    return None
