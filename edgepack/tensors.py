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


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name and shape of one model input or output.

    ``shape`` holds ints for fixed dimensions and None for dynamic ones (e.g. the batch).
    ``quantization`` holds ``{"scale": s, "zero_point": z}`` for integer I/O of quantized models.
    """

    name: str
    dtype: str
    shape: tuple
    quantization: dict | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        data = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantization:
            data["quantization"] = self.quantization
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in data["shape"])
        return cls(data["name"], data["dtype"], shape, data.get("quantization"))

    @property
    def batch_dynamic(self) -> bool:
        return bool(self.shape) and self.shape[0] is None

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

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
