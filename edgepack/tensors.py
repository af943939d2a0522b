"""Tensor specifications shared by the bundle manifest, the converters and the agent."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: ONNX Runtime's type strings ("tensor(float)") to numpy dtype names.
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}


def all_finite(array: np.ndarray) -> bool:
    """Whether a floating array holds no NaN or Inf, in one pass without a temporary array: a sum is
    finite only if every term is (NaN and Inf propagate), so a finite sum settles it; a non-finite one
    (a NaN, or finite values that overflow the sum) is settled element by element."""
    if array.dtype.kind != "f" or not array.size:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(array, axis=None)):
            return True
    return bool(np.isfinite(array).all())


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name and shape of one model input or output.

    ``shape`` holds ints for fixed dimensions and None for dynamic ones (e.g. the batch).
    ``quantization`` holds ``{"scale": s, "zero_point": z}`` for integer I/O of quantized models.
    ``batch_axis`` is the axis that holds samples (0 for most models; 1 for a recurrent state laid out
    ``[layers, batch, hidden]``), None for a per-request constant (a sample rate, a rank-0 flag).
    """

    name: str
    dtype: str
    shape: tuple
    quantization: dict | None = field(default=None, compare=False)
    batch_axis: int | None = field(default=0, compare=False)

    def to_dict(self) -> dict:
        data = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantization:
            data["quantization"] = self.quantization
        if self.sample_axis != 0 and self.shape:
            data["batch_axis"] = self.sample_axis  # absent: axis 0 (what every earlier bundle meant)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in data["shape"])
        return cls(data["name"], data["dtype"], shape, data.get("quantization"), data.get("batch_axis", 0))

    def with_axis(self, axis: int | None) -> "TensorSpec":
        """This spec with samples on ``axis`` (None: a per-request constant)."""
        return TensorSpec(self.name, self.dtype, self.shape, self.quantization, axis)

    @property
    def sample_axis(self) -> int | None:
        """The axis that holds samples; None for a constant (declared so, or rank 0)."""
        if self.batch_axis is None or not 0 <= self.batch_axis < len(self.shape):
            return None
        return self.batch_axis

    @property
    def batch_dim(self) -> int | None:
        """The declared size of the sample axis (None: dynamic, or a constant)."""
        axis = self.sample_axis
        return None if axis is None else self.shape[axis]

    @property
    def batch_dynamic(self) -> bool:
        axis = self.sample_axis
        return axis is not None and self.shape[axis] is None

    def served(self) -> "TensorSpec":
        """The spec callers see: any number of samples on the sample axis (fixed-batch models are split)."""
        axis = self.sample_axis
        if axis is None or self.shape[axis] is None:
            return self
        shape = tuple(None if i == axis else d for i, d in enumerate(self.shape))
        return TensorSpec(self.name, self.dtype, shape, self.quantization, self.batch_axis)

    def count(self, array: np.ndarray) -> int | None:
        """Samples ``array`` holds (None for a constant)."""
        axis = self.sample_axis
        return None if axis is None else int(np.shape(array)[axis])

    def take(self, array: np.ndarray, rows: slice) -> np.ndarray:
        """The samples ``rows`` of ``array`` (a constant: unchanged)."""
        axis = self.sample_axis
        if axis is None:
            return array
        index = [slice(None)] * np.ndim(array)
        index[axis] = rows
        return array[tuple(index)]

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        where = "" if self.sample_axis in (0, None) or not self.shape else f" (samples on axis {self.sample_axis})"
        return f"{self.name}: {self.dtype}[{dims}]{where}"

    def check(self, array: np.ndarray) -> str | None:
        """A message saying why ``array`` does not fit this spec, or None when it does."""
        if len(array.shape) != len(self.shape):
            return f"input {self.name!r} needs rank {len(self.shape)} ({self.describe()}), got shape {list(array.shape)}"
        for axis, (want, got) in enumerate(zip(self.shape, array.shape)):
            if want is not None and want != got:
                return f"input {self.name!r} needs size {want} on axis {axis} ({self.describe()}), got shape {list(array.shape)}"
        return None


def dims_from_ort(shape) -> tuple:
    """ONNX Runtime shapes hold ints, symbolic names or None; keep ints, None for the rest."""
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
