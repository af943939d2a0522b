"""The drift section of a bundle's ``stats/reference.json``: what the agent's tests compare with.

Built by the converter from the validation data (held out from calibration: the data the user says
the model will meet) and the original model's outputs on it. Bounded by construction: per feature the
sorted values, or :data:`QUANTILES` evenly spaced quantiles of a larger sample (65 when an input
has more than 16 features, 33 above 64; the K-S test then bounds the reference CDF between
quantiles, see ``stattests.ks_test``), plus class counts and an embedding centroid: ~30 KB for an
image input with 1000 classes, ~110 KB for 256 tabular columns.
"""

from __future__ import annotations

import numpy as np

from .features import as_feature, input_feature_names, input_features, input_kind, softmax_confidence, unit_rows

#: the false-alarm rate per window the agent's alarms are set to (all of a model's tests together)
FALSE_ALARM_RATE = 0.01
#: quantiles kept per feature (fewer when an input has many features, to keep the bundle small)
QUANTILES = 257
WIDE_QUANTILES = 65
WIDEST_QUANTILES = 33


def _quantiles(column: np.ndarray, points: int) -> list[float]:
    # float32 values written with 9 digits read back exactly; the agent casts its live features to
    # float32 too, so a value both sides see (a confidence of 1.0, a binary column) is the same value
    # on both: rounded stored atoms against unrounded live ones would read as a shift.
    values = np.sort(as_feature(column))
    values = values[np.isfinite(values)]
    if len(values) > points:
        values = values[np.round(np.linspace(0, len(values) - 1, points)).astype(int)]
    return [float(f"{v:.9g}") for v in values]


def _features(matrix: np.ndarray, names: list[str]) -> dict:
    points = QUANTILES if matrix.shape[1] <= 16 else WIDE_QUANTILES if matrix.shape[1] <= 64 else WIDEST_QUANTILES
    return {"features": names, "count": int(len(matrix)),
            "quantiles": [_quantiles(matrix[:, i], points) for i in range(matrix.shape[1])]}


def input_reference(array: np.ndarray) -> dict:
    kind, layout = input_kind(array)
    # In chunks: the image features copy rows in float64, gigabytes for thousands of large images.
    matrix = np.concatenate([input_features(kind, layout, array[i:i + 32]) for i in range(0, len(array), 32)]) \
        if len(array) else input_features(kind, layout, array)
    return {"kind": kind, "layout": layout, **_features(matrix, input_feature_names(kind, layout, np.shape(array)))}


def output_reference(array: np.ndarray, kind: str) -> dict | None:
    """The reference of one output of the original model, by its kind (None: nothing to test)."""
    values = np.asarray(array)
    if not len(values) or values.dtype.kind != "f" or not np.isfinite(values).all():
        return None
    if kind == "classes" and values.ndim == 2 and values.shape[1] >= 2:
        rows = values.astype(np.float64)
        probabilities = bool((rows >= 0).all() and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))
        return {"kind": "classes", "probabilities": probabilities, "count": int(len(rows)),
                "confidence": _quantiles(softmax_confidence(rows, probabilities), QUANTILES),
                "classes": np.bincount(rows.argmax(axis=1), minlength=rows.shape[1]).tolist()}
    if kind == "embedding" and values.ndim == 2:
        rows = unit_rows(values)
        centroid = unit_rows(rows.mean(axis=0, keepdims=True))[0]
        return {"kind": "embedding", "count": int(len(rows)), "centroid": [float(f"{v:.6g}") for v in centroid],
                "cosine": _quantiles(rows @ centroid, QUANTILES)}
    if kind == "regression":
        matrix = values.reshape(len(values), -1).astype(np.float64)
        return {"kind": "regression", **_features(matrix, [f"value[{i}]" for i in range(matrix.shape[1])])} \
            if matrix.shape[1] <= 16 else None
    matrix = input_features("values", None, values)
    return {"kind": "other", **_features(matrix, ["mean", "std", "nonzero"])}


def drift_reference(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None = None,
                    output_kinds: dict[str, str] | None = None) -> dict:
    """The drift section for ``inputs`` (validation data) and the original's ``outputs`` on them."""
    section = {"false_alarm_rate": FALSE_ALARM_RATE, "inputs": {}, "outputs": {}}
    for name, array in inputs.items():
        section["inputs"][name] = input_reference(array)
    for name, array in (outputs or {}).items():
        reference = output_reference(array, (output_kinds or {}).get(name, "other"))
        if reference is not None:
            section["outputs"][name] = reference
    return section
