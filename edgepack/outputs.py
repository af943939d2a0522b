"""What a model output is (class scores, an embedding, a regression, labels, a probability map), decided
the same way by the converter's accuracy gate and the agent's shadow comparison."""

from __future__ import annotations

import numpy as np

#: what an output is, which decides how it is judged
OUTPUT_KINDS = ("classes", "embedding", "regression", "labels", "map", "other")
#: a probability map's pixels count as "on" above this (DB text detectors binarise at 0.3)
MAP_THRESHOLD = 0.3


def is_classifier_output(array: np.ndarray) -> bool:
    """Float [N, C] with C > 1: scores or probabilities over classes (or an embedding: see output_kind)."""
    return array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1


def is_probability_map(reference: np.ndarray) -> bool:
    """[N, C<=2, H>=16, W>=16] floats in [0, 1]: a segmentation or detection probability map (an
    RGB image output in [0, 1] is not one: declare ``--output-kind NAME=map`` for a multi-class map)."""
    reference = np.asarray(reference)
    if reference.ndim != 4 or reference.dtype.kind != "f" or reference.shape[1] > 2 or min(reference.shape[2:]) < 16:
        return False
    low, high = np.nanmin(reference), np.nanmax(reference)  # no copy of the whole map
    # A float32 sigmoid rounds to 1.0000001 now and then.
    return bool(np.isfinite(low) and np.isfinite(high)) and float(low) >= -1e-6 and float(high) <= 1.0 + 1e-6


def output_kind(reference: np.ndarray, declared: str | None = None) -> str:
    """What an output is: ``classes`` (float [N, C] scores), ``embedding`` (float [N, D] whose rows all
    have unit length, as sentence and image encoders return them), ``regression`` (one float per
    sample), ``labels`` (integers or strings), ``map`` (a per-pixel probability map [N, C<=4, H, W] with
    H, W >= 16 and values in [0, 1], as segmentation and text-detection heads return) or ``other``
    (boxes, features, ...). ``declared`` wins."""
    if declared:
        return declared
    reference = np.asarray(reference)
    if reference.dtype.kind in "iubUSO":
        return "labels"
    if reference.dtype.kind != "f":
        return "other"
    if reference.ndim == 1 or (reference.ndim == 2 and reference.shape[1] == 1):
        return "regression"
    if is_probability_map(reference):
        return "map"
    if is_classifier_output(reference):
        rows = reference.astype(np.float64)
        if probabilities_rows(rows):
            return "classes"  # near-one-hot probabilities also have unit length
        norms = np.linalg.norm(rows, axis=1)
        if len(norms) and np.isfinite(norms).all() and np.allclose(norms, 1.0, atol=1e-3):
            return "embedding"
        return "classes"
    return "other"


def top_margin(scores: np.ndarray) -> np.ndarray:
    """How far each sample's top-1 score beats its top-2, in logits. Probabilities (rows of non-negative
    values summing to 1) are compared as log-probabilities, so a margin means the same either way."""
    scores = np.asarray(scores, dtype=np.float64)
    if probabilities_rows(scores):
        scores = np.log(np.maximum(scores, 1e-12))
    top = np.sort(scores, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


def probabilities_rows(rows: np.ndarray) -> bool:
    """Rows of non-negative values that sum to 1 (a softmax output)."""
    return bool(len(rows)) and bool((rows >= 0).all()) and bool(np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))
