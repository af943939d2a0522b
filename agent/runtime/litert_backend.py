"""LiteRT (TFLite) backend: ``ai_edge_litert`` with XNNPACK, or the older ``tflite_runtime``.

Integer I/O of full-int8 models is hidden from callers: float inputs are quantized with the tensor's
scale and zero point and integer outputs dequantized, unless ``integer_io=True`` asks for raw integers.
An interpreter's ``invoke`` is not reentrant, so the backend keeps one interpreter per instance in a pool
and every run takes one for its duration: ``instances`` runs proceed in parallel, more wait.
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import sys
import threading
from pathlib import Path

import numpy as np

from edgepack.errors import RuntimeBackendError, first_line
from edgepack.tensors import TensorSpec

from .base import Backend


def interpreter_class():
    """``Interpreter`` from ai_edge_litert, else from tflite_runtime; a clear error when neither exists."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise RuntimeBackendError(
                "this bundle needs LiteRT, but neither ai-edge-litert nor tflite-runtime is installed; "
                "run: pip install 'edgepack[tflite]'"
            ) from None
    return Interpreter


def _quantization(detail: dict) -> dict | None:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if np.dtype(detail["dtype"]).kind in "iu" and scale:
        return {"scale": float(scale), "zero_point": int(zero_point)}
    return None


class _Interpreter:
    """One interpreter and the input shapes its tensors are currently allocated for."""

    def __init__(self, model_path: Path, threads: int | None):
        Interpreter = interpreter_class()
        try:
            self.interpreter = Interpreter(model_path=str(model_path), num_threads=threads or None)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RuntimeBackendError(f"LiteRT cannot load {Path(model_path).name}: {first_line(exc)}") from None
        #: the input shapes its tensors are allocated for (None: as the model file declares)
        self.batch: tuple | None = None


class LiteRTBackend(Backend):
    """LiteRT interpreters (XNNPACK delegate, ``threads`` threads each), one per concurrent run."""

    runtime = "litert"

    def __init__(self, model_path: Path, threads: int | None = None, integer_io: bool = False,
                 input_names: list[str] | None = None, output_names: list[str] | None = None, instances: int = 1):
        """``input_names``/``output_names`` rename the file's tensors in order (litert-torch calls them
        ``serving_default_args_0``…; bundles keep the source model's names). ``instances`` interpreters
        let that many runs proceed in parallel (``invoke`` is not reentrant, so each run takes one)."""
        silence_delegate_banner()
        first = _Interpreter(model_path, threads)
        self.model_path = Path(model_path)
        self.threads = threads
        self.integer_io = integer_io
        self._in = first.interpreter.get_input_details()
        self._out = first.interpreter.get_output_details()
        signature = [list(d.get("shape_signature", d["shape"])) for d in self._in]
        #: some input dimension is -1: interpreters are resized to each run's shapes. Which dimension
        #: holds the samples is the bundle's layout (``set_layout``), not always axis 0 (a recurrent
        #: state [2, batch, 128], a scalar sample rate); a fixed-batch model gets chunks of its batch
        #: from run_in_batches and runs at the shapes it was allocated with.
        self.resizable = any(-1 in sig for sig in signature)
        first.batch = self._allocated(first)
        self._pool: queue.SimpleQueue[_Interpreter] = queue.SimpleQueue()
        self._pool.put(first)
        self._closed = False
        self._switch = threading.Lock()
        self._names = (input_names, output_names)
        self._build_specs()
        for _ in range(max(1, instances) - 1):
            extra = _Interpreter(model_path, threads)
            extra.batch = first.batch
            self._pool.put(extra)

    def _allocated(self, slot: _Interpreter) -> tuple:
        return tuple(tuple(int(d) for d in detail["shape"]) for detail in slot.interpreter.get_input_details())

    def _build_specs(self) -> None:
        input_names, output_names = self._names
        self.inputs = [self._spec(d, list(d.get("shape_signature", d["shape"]))) for d in self._in]
        self.outputs = [self._spec(d, list(d.get("shape_signature", d["shape"]))) for d in self._out]
        for specs, names in ((self.inputs, input_names), (self.outputs, output_names)):
            if names and len(names) == len(specs):
                specs[:] = [TensorSpec(n, s.dtype, s.shape, s.quantization) for n, s in zip(names, specs)]

    def set_integer_io(self, enabled: bool) -> bool:
        """Switch between float I/O (quantized here) and the model's raw integer tensors."""
        if not any(_quantization(d) for d in self._in + self._out):
            return False
        with self._switch:
            self.integer_io = enabled
            self._build_specs()
            self.restore_layout()  # the rebuilt specs keep the bundle's axes
        return True

    def _spec(self, detail: dict, signature: list) -> TensorSpec:
        quantization = _quantization(detail)
        dtype = np.dtype(detail["dtype"]).name
        if quantization and not self.integer_io:
            dtype = "float32"
        shape = [None if d < 0 else int(d) for d in signature]
        return TensorSpec(detail["name"], dtype, tuple(shape), quantization)

    def _to_model(self, detail: dict, array: np.ndarray) -> np.ndarray:
        quantization = _quantization(detail)
        if quantization and not self.integer_io:
            info = np.iinfo(detail["dtype"])
            scaled = np.round(array / quantization["scale"]) + quantization["zero_point"]
            return np.clip(scaled, info.min, info.max).astype(detail["dtype"])
        # np.asarray keeps a scalar rank 0 (np.ascontiguousarray would make it shape (1,))
        return np.asarray(array, dtype=detail["dtype"], order="C")

    def _from_model(self, detail: dict, array: np.ndarray) -> np.ndarray:
        quantization = _quantization(detail)
        if quantization and not self.integer_io:
            return ((array.astype(np.float32) - quantization["zero_point"]) * quantization["scale"]).astype(np.float32)
        return array

    def _invoke(self, slot: _Interpreter, arrays: list[np.ndarray]) -> list[np.ndarray]:
        interpreter = slot.interpreter
        # Keyed by every input's shape: the batch need not lie on axis 0 of each (a recurrent state).
        shapes = tuple(tuple(array.shape) for array in arrays)
        if self.resizable and arrays and shapes != slot.batch:
            for detail, array in zip(self._in, arrays):
                interpreter.resize_tensor_input(detail["index"], list(array.shape), strict=False)
            interpreter.allocate_tensors()
            slot.batch = shapes
        for detail, array in zip(self._in, arrays):
            interpreter.set_tensor(detail["index"], self._to_model(detail, array))
        interpreter.invoke()
        return [self._from_model(detail, interpreter.get_tensor(detail["index"]).copy()) for detail in self._out]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [feeds[spec.name] for spec in self.inputs]
        slot = self._take()
        try:
            # Fixed-batch models get chunks of their batch from run_in_batches, the one splitter.
            return self._invoke(slot, arrays)
        except (ValueError, RuntimeError) as exc:
            raise RuntimeBackendError(f"inference failed: {first_line(exc)}") from None
        finally:
            self._pool.put(slot)

    def _take(self) -> _Interpreter:
        """A free interpreter; waits while every one is busy, fails once the backend is closed."""
        while True:
            if self._closed:
                raise RuntimeBackendError("the model was closed")
            try:
                return self._pool.get(timeout=0.25)
            except queue.Empty:
                continue

    def op_names(self) -> set[str]:
        """The op names of the model as written (before XNNPACK replaces them with a DELEGATE node)."""
        return model_ops(self.model_path)

    def close(self) -> None:
        """Refuse new runs; the interpreters are freed once runs in flight hand theirs back."""
        self._closed = True
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break


#: A 276-byte .tflite (float32[1] x -> ADD(x, x)), built once with ai_edge_litert's schema object API
#: (ModelT with one ADD op), for ``silence_delegate_banner``.
_TINY_MODEL = (
    "GAAAAFRGTDMAAA4AFAAQAAwACAAAAAQADgAAABAAAAAYAAAA4AAAAAMAAAABAAAABAAAACj///8BAAAAEAAAAAwAFAAQAAwACAAEAAwAAAAQ"
    "AAAAUAAAAFQAAABYAAAAAQAAABQAAAAAAA4AFAAAABAADAALAAQADgAAABAAAAAAAAALDAAAABAAAACA////AQAAAAEAAAACAAAAAAAAAAAA"
    "AAABAAAAAQAAAAEAAAAAAAAAAgAAADAAAAAEAAAA5P///wgAAAAMAAAAAQAAAHkAAAABAAAAAQAAAAwADAAIAAAAAAAEAAwAAAAIAAAADAAA"
    "AAEAAAB4AAAAAQAAAAEAAAABAAAACAAAAAQABAAEAAAA"
)
_banner_silenced = False


def silence_delegate_banner() -> None:
    """Keep LiteRT's one-time "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." off stderr.

    The runtime prints it with C stdio once per process, the first time the delegate is created, and
    has no Python switch for it (google-ai-edge/LiteRT#7420). The agent's stderr carries JSON log lines,
    so before the first real interpreter a tiny one is created with file descriptor 2 pointed at
    /dev/null; later interpreters print nothing. The logging handlers' locks are held meanwhile, so a
    log line from another thread waits those few milliseconds instead of being lost.
    """
    global _banner_silenced
    if _banner_silenced:
        return
    Interpreter = interpreter_class()
    _banner_silenced = True
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    for handler in handlers:
        handler.acquire()
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            try:
                Interpreter(model_content=base64.b64decode(_TINY_MODEL), num_threads=1).allocate_tensors()
            except (ValueError, RuntimeError):
                pass  # a runtime that rejects the tiny model prints its banner later; harmless
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    finally:
        for handler in reversed(handlers):
            handler.release()


def model_ops(model_path: Path) -> set[str]:
    """Builtin/custom op names of a .tflite file, read with the default delegates off."""
    Interpreter = interpreter_class()
    try:
        from ai_edge_litert.interpreter import OpResolverType
    except ImportError:
        from tflite_runtime.interpreter import OpResolverType
    interpreter = Interpreter(model_path=str(model_path),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return {op["op_name"] for op in interpreter._get_ops_details()}  # noqa: SLF001 - no public API lists ops
