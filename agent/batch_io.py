"""Batch scoring files: read inputs from .npy/.npz/.jsonl, write outputs to .npy/.npz/.jsonl atomically."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from edgepack.atomic import atomic_write
from edgepack.errors import DataError, InputFileError, UsageError
from edgepack.tensors import TensorSpec

FORMATS = (".npy", ".npz", ".jsonl")


def read_inputs(path: Path, inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Inputs by name, the samples on each input's own axis (``TensorSpec.sample_axis``)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"input file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    names = [spec.name for spec in inputs]
    try:
        if suffix == ".npy":
            if len(inputs) != 1:
                raise DataError(f"the model has {len(inputs)} inputs ({', '.join(names)}); give an .npz keyed by input name")
            return {names[0]: np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
            if len(inputs) == 1 and len(arrays) == 1:
                return {names[0]: next(iter(arrays.values()))}
            # A constant input (a sample rate) may be left out: the bundle's default fills it.
            missing = [spec.name for spec in inputs if spec.name not in arrays and spec.sample_axis is not None]
            if missing:
                raise DataError(f"{path.name} lacks arrays for the inputs {missing}; it has {sorted(arrays)}")
            return {n: arrays[n] for n in names if n in arrays}
    except (ValueError, OSError) as exc:
        raise InputFileError(f"{path.name} is not a readable {suffix} file ({exc})") from None
    if suffix == ".jsonl":
        return _read_jsonl(path, inputs)
    raise InputFileError(f"unknown input format {suffix!r}; use {', '.join(FORMATS)}")


def _read_jsonl(path: Path, inputs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """One JSON value per line, one sample each: an object keyed by input name, or (one input) the
    sample itself. A sample is the tensor without its samples' axis, stacked along that axis (axis 1 of
    a ``state [2, batch, 128]``: each line holds a [2, 128]); a constant input (a sample rate) may be
    left out (the bundle's default fills it) or given once per line with the same value."""
    columns: dict[str, list] = {spec.name: [] for spec in inputs}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise DataError(f"{path.name} line {number} is not valid JSON") from None
            if not isinstance(record, dict):
                if len(inputs) != 1:
                    raise DataError(f"{path.name} line {number}: give an object keyed by input name")
                record = {inputs[0].name: record}
            for spec in inputs:
                if spec.name in record:
                    columns[spec.name].append(record[spec.name])
                elif spec.sample_axis is not None:
                    raise DataError(f"{path.name} line {number} lacks input {spec.name!r}")
    if not any(columns[spec.name] for spec in inputs if spec.sample_axis is not None):
        raise DataError(f"{path.name} holds no samples")
    result = {}
    for spec in inputs:
        values = columns[spec.name]
        if not values:
            continue  # a constant left out
        try:
            if spec.sample_axis is None:
                first = np.asarray(values[0], dtype=spec.dtype)
                if any(not np.array_equal(np.asarray(value, dtype=spec.dtype), first) for value in values[1:]):
                    raise DataError(f"{path.name}: input {spec.name!r} is a constant (one value for every sample) but "
                                    "its value changes between lines; score each value in its own file")
                result[spec.name] = first
            else:
                result[spec.name] = np.stack([np.asarray(value, dtype=spec.dtype) for value in values], axis=spec.sample_axis)
        except (ValueError, TypeError):  # numpy's AxisError is a ValueError
            where = f" along axis {spec.sample_axis}" if spec.sample_axis else ""
            raise DataError(f"{path.name}: input {spec.name!r} has ragged or non-numeric samples, or samples that do not "
                            f"stack{where} (give each line's sample without that axis)") from None
    return result


def sample_axes(outputs: dict[str, np.ndarray], specs: list[TensorSpec] | None = None) -> dict[str, int | None]:
    """Each output's samples axis (``specs``; absent: axis 0), None for a scalar or a batch-free output."""
    axes = {spec.name: spec.sample_axis for spec in specs or []}
    return {name: axes.get(name, 0) if np.ndim(value) else None for name, value in outputs.items()}


def sample_count(outputs: dict[str, np.ndarray], specs: list[TensorSpec] | None = None) -> int:
    """How many samples ``outputs`` hold, counted along each output's own samples axis."""
    axis = sample_axes(outputs, specs)
    return max((np.shape(value)[axis[name]] for name, value in outputs.items() if axis[name] is not None), default=1)


def write_outputs(path: Path, outputs: dict[str, np.ndarray], specs: list[TensorSpec] | None = None) -> None:
    """Write outputs by the suffix of ``path``; never leaves a half-written file. ``specs`` say on which
    axis each output holds its samples (JSONL writes one sample per line; absent: axis 0)."""
    path = Path(path)
    suffix = path.suffix.lower()
    buffer = io.BytesIO()
    if suffix == ".npy":
        np.save(buffer, next(iter(outputs.values())), allow_pickle=False)
    elif suffix == ".npz":
        np.savez(buffer, **outputs)
    elif suffix == ".jsonl":
        axis = sample_axes(outputs, specs)
        for index in range(sample_count(outputs, specs)):
            record = {name: (np.take(value, index, axis=axis[name]) if axis[name] is not None else np.asarray(value)).tolist()
                      for name, value in outputs.items()}
            buffer.write((json.dumps(record) + "\n").encode())
    else:
        raise UsageError(f"unknown output format {suffix!r}; use {', '.join(FORMATS)}")
    atomic_write(path, buffer.getvalue())
