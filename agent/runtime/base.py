"""The backend interface and the helpers every backend shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from edgepack.errors import DataError, RuntimeBackendError
from edgepack.tensors import TensorSpec


class Backend(ABC):
    """A loaded model that runs batches of numpy inputs."""

    #: "onnxruntime" or "litert"
    runtime: str = ""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; return the outputs in ``self.outputs`` order."""

    def close(self) -> None:
        """Release the session (idempotent)."""

    def set_integer_io(self, enabled: bool) -> bool:
        """Take and return the model's raw integer tensors instead of floats; False when the model has
        no quantized inputs or outputs (only full-integer TFLite models do)."""
        return False

    @property
    def batch_dynamic(self) -> bool:
        """True when every input takes any batch size."""
        return all(spec.batch_dynamic for spec in self.inputs)

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Match ``feeds`` to the inputs by name and dtype; raise DataError naming the problem."""
        names = [spec.name for spec in self.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise DataError(
                f"inputs do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'}; "
                f"the model takes {', '.join(s.describe() for s in self.inputs)}"
            )
        checked = {}
        for spec in self.inputs:
            array = np.asarray(feeds[spec.name])
            if array.dtype != np.dtype(spec.dtype):
                if array.dtype.kind in "fiub" and np.dtype(spec.dtype).kind in "fiub":
                    array = array.astype(spec.dtype)
                else:
                    raise DataError(f"input {spec.name!r} needs dtype {spec.dtype}, got {array.dtype}")
            problem = spec.check(array)
            if problem:
                raise DataError(problem)
            checked[spec.name] = array
        return checked


def run_in_batches(backend: Backend, feeds: dict[str, np.ndarray], max_batch: int = 64) -> list[np.ndarray]:
    """Run N samples through ``backend`` in chunks its batch dimension accepts; concatenate outputs."""
    if not feeds:
        raise DataError("no inputs given")
    count = len(next(iter(feeds.values())))
    if any(len(array) != count for array in feeds.values()):
        raise DataError("all inputs must hold the same number of samples (first axis)")
    if backend.batch_dynamic:
        step = max(1, max_batch)
    else:
        fixed = backend.inputs[0].shape[0] if backend.inputs[0].shape else 1
        step = fixed or 1
        if count % step:
            raise DataError(f"the model takes batches of exactly {step}; {count} samples cannot be split evenly")
    chunks: list[list[np.ndarray]] = []
    for start in range(0, count, step):
        chunks.append(backend.run({name: array[start : start + step] for name, array in feeds.items()}))
    return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))]


def load_backend(model_path: Path, model_format: str, threads: int | None = None, providers=None,
                 input_names=None, output_names=None, integer_io: bool = False, instances: int = 1) -> Backend:
    """Load ``model_path`` with the backend for ``model_format`` ("onnx" or "tflite").

    ``instances``: how many runs may proceed at once (an ONNX Runtime session is shared by all; LiteRT
    gets one interpreter each)."""
    if model_format == "onnx":
        from .onnx_backend import OnnxBackend

        return OnnxBackend(model_path, threads=threads, providers=providers)
    if model_format == "tflite":
        from .litert_backend import LiteRTBackend

        return LiteRTBackend(model_path, threads=threads, integer_io=integer_io, input_names=input_names,
                             output_names=output_names, instances=instances)
    raise RuntimeBackendError(f"model format {model_format!r} is not supported by this agent; upgrade edgepack")
