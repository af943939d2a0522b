"""What drift is measured on: a few numbers per sample, chosen by what the tensor is.

The converter summarises the validation data with these functions and the agent computes the same
numbers on live traffic, so both sides always agree on what a feature is.

Inputs (:func:`input_kind`):
- ``image`` (float [N, C, H, W], [N, H, W, C] with C <= 4, or [N, H, W]): per channel the mean
  (exposure) and standard deviation (contrast), and one sharpness (mean absolute difference of
  neighbouring pixels: blur lowers it, sensor noise raises it). One histogram of every pixel mixes
  these up and moves with the subject of the picture.
- ``features`` (float [N, F] with F <= :data:`MAX_FEATURES`, or [N]): each column, tested on its own.
- ``values`` (anything else: token ids, audio, maps): per sample the mean, standard deviation and the
  share of non-zero values (a padded sequence's length).

Outputs (:func:`output_kind` in the converter's gate decides the kind):
- ``classes``: the top-1 confidence (softmax of logits) and which class won;
- ``embedding``: the cosine to the reference centroid;
- ``regression``: the value; ``other``: as ``values``.
"""

from __future__ import annotations

import numpy as np

#: a 2-D float input with more columns than this is summarised as ``values``, not tested per column
MAX_FEATURES = 256
#: pixels per channel the image statistics look at (a strided subsample of larger images)
IMAGE_PIXELS = 4096
#: values per sample the ``values`` summary looks at
MAX_VALUES = 4096


def as_feature(values) -> np.ndarray:
    """Feature values as both sides store and compare them: float32 precision, held in float64."""
    return np.asarray(values, np.float64).astype(np.float32).astype(np.float64)


def image_layout(shape: tuple) -> str | None:
    """``nchw``, ``nhwc`` or ``nhw`` when ``shape`` (with its batch axis) looks like images, else None."""
    if len(shape) == 4:
        if 1 <= shape[1] <= 4 and shape[2] >= 8 and shape[3] >= 8:
            return "nchw"
        if 1 <= shape[3] <= 4 and shape[1] >= 8 and shape[2] >= 8:
            return "nhwc"
    if len(shape) == 3 and shape[1] >= 8 and shape[2] >= 8:
        return "nhw"
    return None


def input_kind(array: np.ndarray) -> tuple[str, str | None]:
    """(kind, image layout) of an input, from its validation data."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        layout = image_layout(array.shape)
        if layout:
            return "image", layout
        if array.ndim == 1 or (array.ndim == 2 and array.shape[1] <= MAX_FEATURES):
            return "features", None
    return "values", None


def input_feature_names(kind: str, layout: str | None, shape: tuple) -> list[str]:
    """Names of the columns :func:`input_features` returns (for events and metrics)."""
    if kind == "image":
        channels = {"nchw": shape[1], "nhwc": shape[-1], "nhw": 1}[layout]
        return [f"mean[{c}]" for c in range(channels)] + [f"std[{c}]" for c in range(channels)] + ["sharpness"]
    if kind == "features":
        return [f"feature[{i}]" for i in range(1 if len(shape) == 1 else shape[1])]
    return ["mean", "std", "nonzero"]


def _values_summary(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(len(array), -1)
    flat = flat[:, ::max(1, flat.shape[1] // MAX_VALUES)].astype(np.float64)
    flat = np.where(np.isfinite(flat), flat, 0.0)
    return np.stack([flat.mean(axis=1), flat.std(axis=1), (flat != 0).mean(axis=1)], axis=1)


def _image_summary(array: np.ndarray, layout: str) -> np.ndarray:
    images = {"nchw": lambda a: a, "nhwc": lambda a: a.transpose(0, 3, 1, 2), "nhw": lambda a: a[:, None]}[layout](array)
    height, width = images.shape[2], images.shape[3]
    stride = max(1, int(np.ceil(np.sqrt(height * width / IMAGE_PIXELS))))
    sub = images[:, :, ::stride, ::stride].astype(np.float64)
    count = len(images)
    means = sub.reshape(count, images.shape[1], -1).mean(axis=2)
    stds = sub.reshape(count, images.shape[1], -1).std(axis=2)
    # Neighbours at full resolution on every stride-th row and column: a subsample would hide blur.
    rows = images[:, :, ::stride, :].astype(np.float64)
    columns = images[:, :, :, ::stride].astype(np.float64)
    sharpness = (np.abs(np.diff(rows, axis=3)).reshape(count, -1).mean(axis=1)
                 + np.abs(np.diff(columns, axis=2)).reshape(count, -1).mean(axis=1)) / 2.0
    summary = np.concatenate([means, stds, sharpness[:, None]], axis=1)
    return np.where(np.isfinite(summary), summary, 0.0)


def input_features(kind: str, layout: str | None, array: np.ndarray) -> np.ndarray:
    """[N, k] float64: the drift features of each sample of one input."""
    array = np.asarray(array)
    if kind == "image":
        return _image_summary(array, layout)
    if kind == "features":
        return array.reshape(len(array), -1).astype(np.float64)
    return _values_summary(array)


def softmax_confidence(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    """The top-1 probability of each row (softmax first when the rows are logits)."""
    rows = np.asarray(scores, np.float64)
    if probabilities:
        return rows.max(axis=1)
    shifted = rows - rows.max(axis=1, keepdims=True)
    return 1.0 / np.exp(shifted).sum(axis=1)


def unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64).reshape(len(rows), -1)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
