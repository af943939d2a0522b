"""The backend interface and the one batch splitter every caller goes through.

Axis 0 of every input and output is the batch axis. A backend declares what its model file accepts
there (``batch_size``: None for any size, else the fixed size it was exported with); callers hand any
number of samples to :func:`run_in_batches`, which splits them into chunks the model takes, pads a
last partial chunk of a fixed-batch model (and drops the padded rows), and concatenates the outputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from edgepack.errors import DataError, RuntimeBackendError
from edgepack.tensors import TensorSpec


def served_spec(spec: TensorSpec) -> TensorSpec:
    """The spec callers see: any number of samples on the batch axis (fixed-batch models are split)."""
    if not spec.shape or spec.shape[0] is None:
        return spec
    return TensorSpec(spec.name, spec.dtype, (None, *spec.shape[1:]), spec.quantization)


class Backend(ABC):
    """A loaded model that runs batches of numpy inputs."""

    #: "onnxruntime" or "litert"
    runtime: str = ""

    #: what the model file declares (a fixed batch dimension stays fixed here)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch the model file accepts as is; return the outputs in ``self.outputs`` order."""

    def close(self) -> None:
        """Release the session (idempotent)."""

    def set_integer_io(self, enabled: bool) -> bool:
        """Take and return the model's raw integer tensors instead of floats; False when the model has
        no quantized inputs or outputs (only full-integer TFLite models do)."""
        return False

    @property
    def batched(self) -> bool:
        """True when every input has a batch axis (rank >= 1), so samples can be split and merged."""
        return bool(self.inputs) and all(len(spec.shape) >= 1 for spec in self.inputs)

    @property
    def batch_size(self) -> int | None:
        """None when every input takes any batch size; else the fixed batch the model was exported with."""
        if all(spec.batch_dynamic for spec in self.inputs) or not self.batched:
            return None
        return int(next(spec.shape[0] for spec in self.inputs if not spec.batch_dynamic))

    @property
    def batch_dynamic(self) -> bool:
        """True when every input takes any batch size."""
        return self.batch_size is None

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Match ``feeds`` to the inputs by name, dtype and every non-batch dimension (any number of
        samples: fixed-batch models are split); raise DataError naming the problem."""
        names = [spec.name for spec in self.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise DataError(
                f"inputs do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'}; "
                f"the model takes {', '.join(served_spec(s).describe() for s in self.inputs)}"
            )
        checked = {}
        for spec in self.inputs:
            array = np.asarray(feeds[spec.name])
            if array.dtype != np.dtype(spec.dtype):
                if array.dtype.kind in "fiub" and np.dtype(spec.dtype).kind in "fiub":
                    array = array.astype(spec.dtype)
                else:
                    raise DataError(f"input {spec.name!r} needs dtype {spec.dtype}, got {array.dtype}")
            problem = (served_spec(spec) if self.batched else spec).check(array)
            if problem:
                raise DataError(problem)
            checked[spec.name] = array
        if self.batched:
            counts = {len(array) for array in checked.values()}
            if len(counts) > 1:
                raise DataError(f"all inputs must hold the same number of samples (first axis); got {sorted(counts)}")
        return checked


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` grown to ``size`` rows by repeating its last row (rows that are dropped again)."""
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])


def run_in_batches(backend: Backend, feeds: dict[str, np.ndarray], max_batch: int = 64) -> list[np.ndarray]:
    """Run N checked samples through ``backend`` in chunks it accepts; concatenate the outputs.

    A dynamic-batch model runs chunks of up to ``max_batch``. A fixed-batch-N model runs chunks of N;
    a last partial chunk is padded with copies of its last sample and the padded rows are dropped.
    ``max_batch=1`` runs every sample alone (a fixed batch N > 1 then holds N copies of the sample), so
    a model whose outputs depend on the rest of the batch answers each sample as it would alone.
    """
    if not feeds:
        raise DataError("no inputs given")
    if not backend.batched:
        return backend.run(feeds)
    count = len(next(iter(feeds.values())))
    if any(len(array) != count for array in feeds.values()):
        raise DataError("all inputs must hold the same number of samples (first axis)")
    if count == 0:
        raise DataError("no samples given (the first axis is 0)")
    fixed = backend.batch_size
    step = 1 if max_batch <= 1 else (fixed or max_batch)
    chunks: list[list[np.ndarray]] = []
    for start in range(0, count, step):
        chunk = {name: array[start:start + step] for name, array in feeds.items()}
        real = min(step, count - start)
        size = fixed or real
        if real < size:
            chunk = {name: _pad(array, size) for name, array in chunk.items()}
        outputs = backend.run(chunk)
        if real < size:
            outputs = [np.asarray(output)[:real] for output in outputs]
        chunks.append(outputs)
    if len(chunks) == 1:
        return chunks[0]
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
