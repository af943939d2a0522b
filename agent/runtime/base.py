"""The backend interface and the one batch splitter every caller goes through.

Each input and output holds its samples on one axis (``TensorSpec.sample_axis``: 0 for most models,
1 for a recurrent state laid out ``[layers, batch, hidden]``) or is a per-request constant (rank 0, or
declared so: a sample rate), passed whole to every run. A backend declares what its model file accepts
on the sample axis (``batch_size``: None for any size, else the fixed size it was exported with);
callers hand any number of samples to :func:`run_in_batches`, which splits them into chunks the model
takes, pads a last partial chunk of a fixed-batch model (and drops the padded rows), and concatenates
the outputs, each along its own axis.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from edgepack.errors import DataError, RuntimeBackendError
from edgepack.tensors import TensorSpec


def served_spec(spec: TensorSpec) -> TensorSpec:
    """The spec callers see: any number of samples on the sample axis (fixed-batch models are split)."""
    return spec.served()


def plain_layout(specs: list[TensorSpec]) -> bool:
    """True when every tensor holds its samples on axis 0 (requests may then be merged by concatenation)."""
    return all(spec.sample_axis == 0 for spec in specs)


class Backend(ABC):
    """A loaded model that runs batches of numpy inputs."""

    #: "onnxruntime" or "litert"
    runtime: str = ""

    #: what the model file declares (a fixed batch dimension stays fixed here)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: values of constant inputs a request may leave out (the bundle's ``batch.constants``)
    defaults: dict[str, np.ndarray] = {}

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch the model file accepts as is; return the outputs in ``self.outputs`` order."""

    def close(self) -> None:
        """Release the session (idempotent)."""

    def set_integer_io(self, enabled: bool) -> bool:
        """Take and return the model's raw integer tensors instead of floats; False when the model has
        no quantized inputs or outputs (only full-integer TFLite models do)."""
        return False

    def set_layout(self, axes: dict[str, int | None], defaults: dict | None = None) -> None:
        """Put the samples of the named inputs and outputs on the given axes (None: a constant), as the
        bundle's manifest records them; ``defaults`` fill constant inputs a request leaves out."""
        self._layout = (dict(axes), dict(defaults or {}))
        for attribute in ("inputs", "outputs"):
            specs = getattr(self, attribute)
            setattr(self, attribute, [spec.with_axis(axes[spec.name]) if spec.name in axes else spec for spec in specs])
        names = {spec.name for spec in self.inputs}
        self.defaults = {name: np.asarray(value, dtype=next(s.dtype for s in self.inputs if s.name == name))
                         for name, value in (defaults or {}).items() if name in names}

    def restore_layout(self) -> None:
        """Apply the layout given to :meth:`set_layout` again (after a backend rebuilt its specs)."""
        layout = getattr(self, "_layout", None)
        if layout is not None:
            self.set_layout(*layout)

    @property
    def batched(self) -> bool:
        """True when some input holds samples (the others being constants), so samples can be split."""
        return any(spec.sample_axis is not None for spec in self.inputs)

    @property
    def plain(self) -> bool:
        """True when every input and output holds its samples on axis 0."""
        # An output's declared shape may be unknown (rank 0 in the file): its declared axis counts.
        return plain_layout(self.inputs) and all(spec.batch_axis == 0 for spec in self.outputs)

    @property
    def batch_size(self) -> int | None:
        """None when every batched input takes any batch size; else the fixed batch the model was
        exported with."""
        fixed = [spec.batch_dim for spec in self.inputs if spec.sample_axis is not None and spec.batch_dim is not None]
        return int(fixed[0]) if fixed else None

    @property
    def batch_dynamic(self) -> bool:
        """True when every input takes any batch size."""
        return self.batch_size is None

    def count(self, feeds: dict[str, np.ndarray]) -> int:
        """Samples ``feeds`` hold (1 for a model without batched inputs); DataError when inputs disagree."""
        counts = {spec.name: spec.count(feeds[spec.name]) for spec in self.inputs
                  if spec.name in feeds and spec.sample_axis is not None}
        if not counts:
            return 1
        if len(set(counts.values())) > 1:
            where = ", ".join(f"{name} {count} on axis {self._axis(name)}" for name, count in counts.items())
            raise DataError(f"all inputs must hold the same number of samples; got {where}")
        return next(iter(counts.values()))

    def _axis(self, name: str) -> int | None:
        return next(spec.sample_axis for spec in self.inputs if spec.name == name)

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Match ``feeds`` to the inputs by name, dtype and every non-batch dimension (any number of
        samples: fixed-batch models are split); a constant input left out takes its default; raise
        DataError naming the problem."""
        names = [spec.name for spec in self.inputs]
        missing = [n for n in names if n not in feeds and n not in self.defaults]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise DataError(
                f"inputs do not match the model: missing {missing or 'none'}, unexpected {extra or 'none'}; "
                f"the model takes {', '.join(served_spec(s).describe() for s in self.inputs)}"
            )
        checked = {}
        for spec in self.inputs:
            array = np.asarray(feeds[spec.name]) if spec.name in feeds else self.defaults[spec.name]
            if array.dtype != np.dtype(spec.dtype):
                if array.dtype.kind in "fiub" and np.dtype(spec.dtype).kind in "fiub":
                    array = array.astype(spec.dtype)
                else:
                    raise DataError(f"input {spec.name!r} needs dtype {spec.dtype}, got {array.dtype}")
            if spec.sample_axis is None and not spec.shape and array.shape == (1,):
                array = array.reshape(())  # a scalar sent as a one-element tensor (OIP clients often do)
            problem = served_spec(spec).check(array)
            if problem:
                raise DataError(problem)
            checked[spec.name] = array
        self.count(checked)
        return checked


def _pad(spec: TensorSpec, array: np.ndarray, size: int) -> np.ndarray:
    """``array`` grown to ``size`` samples by repeating its last one (samples that are dropped again)."""
    axis = spec.sample_axis
    last = spec.take(array, slice(-1, None))
    return np.concatenate([array, np.repeat(last, size - array.shape[axis], axis=axis)], axis=axis)


def _output_axis(spec: TensorSpec, array: np.ndarray) -> int | None:
    # An output's declared shape may be unknown (rank 0 in the file) while the array has a batch: the
    # declared axis counts whenever the array has it.
    axis = spec.batch_axis
    return axis if axis is not None and 0 <= axis < np.ndim(array) else None


def _join(spec: TensorSpec, parts: list[np.ndarray]) -> np.ndarray:
    axis = _output_axis(spec, parts[0])
    if axis is None:
        return parts[0]  # a constant output: the same in every chunk
    return np.concatenate(parts, axis=axis)


def _trim(spec: TensorSpec, array: np.ndarray, real: int) -> np.ndarray:
    axis = _output_axis(spec, array)
    if axis is None:
        return array
    index = [slice(None)] * array.ndim
    index[axis] = slice(0, real)
    return array[tuple(index)]


def run_in_batches(backend: Backend, feeds: dict[str, np.ndarray], max_batch: int = 64) -> list[np.ndarray]:
    """Run N checked samples through ``backend`` in chunks it accepts; concatenate the outputs.

    A dynamic-batch model runs chunks of up to ``max_batch``. A fixed-batch-N model runs chunks of N;
    a last partial chunk is padded with copies of its last sample and the padded rows are dropped.
    ``max_batch=1`` runs every sample alone (a fixed batch N > 1 then holds N copies of the sample), so
    a model whose outputs depend on the rest of the batch answers each sample as it would alone.
    Constant inputs go whole to every chunk.
    """
    if not feeds:
        raise DataError("no inputs given")
    if not backend.batched:
        return backend.run(feeds)
    specs = {spec.name: spec for spec in backend.inputs}
    count = backend.count(feeds)
    if count == 0:
        raise DataError("no samples given (the sample axis is 0)")
    fixed = backend.batch_size
    step = 1 if max_batch <= 1 else (fixed or max_batch)
    chunks: list[list[np.ndarray]] = []
    for start in range(0, count, step):
        rows = slice(start, start + step)
        chunk = {name: specs[name].take(array, rows) if name in specs else array for name, array in feeds.items()}
        real = min(step, count - start)
        size = fixed or real
        if real < size:
            chunk = {name: _pad(specs[name], array, size) if specs[name].sample_axis is not None else array
                     for name, array in chunk.items()}
        outputs = backend.run(chunk)
        if real < size:
            outputs = [_trim(spec, np.asarray(output), real) for spec, output in zip(backend.outputs, outputs)]
        chunks.append(outputs)
    if len(chunks) == 1:
        return chunks[0]
    return [_join(spec, [chunk[i] for chunk in chunks]) for i, spec in enumerate(backend.outputs)]


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
