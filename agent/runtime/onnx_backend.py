"""ONNX Runtime backend: picks execution providers from the profile and what is installed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgepack.errors import RuntimeBackendError, first_line
from edgepack.tensors import ORT_TYPES, TensorSpec, dims_from_ort

from .base import Backend

log = logging.getLogger(__name__)


def choose_providers(wanted: list[str] | None) -> list[str]:
    """The profile's providers that this onnxruntime build has, in the profile's order; CPU always last."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in (wanted or []) if p in available and p != "CPUExecutionProvider"]
    skipped = [p for p in (wanted or []) if p not in available]
    if skipped:
        log.info("execution providers not available here, skipped: %s", ", ".join(skipped))
    return chosen + ["CPUExecutionProvider"]


#: Whether ONNX Runtime's intra-op threads spin while they wait for work (ORT's default). Spinning saves
#: a wake-up per call when the model has the cores to itself, and costs twice the time when anything
#: else wants them: measured on 2 cores, batch 8 of a small CNN takes 8 ms spinning alone, 24 ms spinning
#: beside one busy process, 12 ms not spinning. Every ``edgepack-agent`` command turns it off, the daemon
#: unless ``server.intra_op_spinning`` says otherwise: its own event loop, and usually the application
#: feeding it, share the cores with the model. The converter's accuracy runs keep ORT's default; the
#: sessions its gate times never spin (``OnnxBackend(spinning=False)``), as the agent runs them.
#: ``between_runs``: whether they go on spinning after a run returns (ORT's default). The daemon stops
#: them there (``session.force_spinning_stop``): its next run comes through the event loop, which needs
#: the cores meanwhile; measured on 2 cores (benchmarks/serving.py's CNN over HTTP), spinning that stops
#: after each run served 162 req/s at c=1 and 198 at c=8, spinning that goes on 150 and 153, not
#: spinning 126 and 188; beside one busy process, not spinning stays the fastest (90 and 111 against 71
#: and 86), hence the daemon's default.
SPINNING = {"allowed": True, "between_runs": True}


def allow_spinning(allowed: bool, between_runs: bool = True) -> None:
    """Set whether sessions created from now on let their intra-op threads spin, and whether they go on
    spinning after a run returns (see SPINNING)."""
    SPINNING["allowed"] = allowed
    SPINNING["between_runs"] = between_runs


class OnnxBackend(Backend):
    """One ``onnxruntime.InferenceSession``; ``run`` is thread-safe (ORT sessions are)."""

    runtime = "onnxruntime"

    def __init__(self, model_path: Path, threads: int | None = None, providers: list[str] | None = None,
                 log_severity: int = 3, optimize: bool = True, spinning: bool | None = None):
        """``log_severity``: ONNX Runtime's own stderr logging (3: errors, 4: fatal only). ``optimize=False``
        runs the graph node by node as written (a QDQ graph as its reference float arithmetic, not
        through this CPU's fused integer kernels). ``spinning``: whether the intra-op threads spin,
        for this session only (default: as :data:`SPINNING` says)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                             else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = log_severity
        if not (SPINNING["allowed"] if spinning is None else spinning):
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif not SPINNING["between_runs"]:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=choose_providers(providers))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            raise RuntimeBackendError(f"ONNX Runtime cannot load {Path(model_path).name}: {first_line(exc)}") from None
        self.providers = self.session.get_providers()
        self.inputs = [TensorSpec(i.name, ORT_TYPES.get(i.type, i.type), dims_from_ort(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(o.name, ORT_TYPES.get(o.type, o.type), dims_from_ort(o.shape)) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(self._output_names, feeds)
        except Exception as exc:
            raise RuntimeBackendError(f"inference failed: {first_line(exc)}") from None

    def close(self) -> None:
        self.session = None
