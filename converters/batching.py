"""The batch semantics of an exported graph: dynamic where the source allows it, checked, else fixed.

Most users export at a fixed batch of 1 (``torch.export.export(model, (torch.randn(1, 3, 224, 224),))``,
a TorchScript trace, an ONNX file with ``batch=1`` declared). The agent can split N samples into
chunks of a fixed batch, but a dynamic batch serves batches in one run. So the converter tries to make
the batch dynamic (the torch sources re-export with a symbolic batch; an ONNX graph whose batch is only
*declared* fixed is relaxed), and keeps the dynamic graph only when it computes, at batch 1 and at
batch N, what the original computes sample by sample. Otherwise the graph keeps the original's fixed
batch and the report says why. Each candidate is then checked for batch invariance (does a sample's
output depend on the rest of its batch?) before it is shipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .evaluation import Backend

log = logging.getLogger(__name__)

#: samples the batch checks run (alone and together)
CHECK_SAMPLES = 5
#: a sample's outputs alone and inside a batch may differ by this much, relative to the outputs' range,
#: and still count as the same answer (float kernels reassociate sums differently for other batch sizes)
INVARIANCE_TOLERANCE = 1e-4


@dataclass
class BatchSemantics:
    """What the bundle records under ``batch``."""

    mode: str  # "dynamic" | "fixed"
    size: int | None = None
    invariant: bool = True
    deviation: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "size": self.size, "invariant": self.invariant,
                "max_relative_deviation": float(f"{self.deviation:.3g}")}


def graph_batch(path: Path, axes: dict | None = None) -> int | None:
    """The fixed batch an ONNX graph declares on its first batched input (None: symbolic or absent);
    ``axes`` says where each tensor holds its samples (absent: axis 0, None: a constant)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        axis = (axes or {}).get(value.name, 0)
        if value.name in initializers or axis is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) > axis and dims[axis].HasField("dim_value"):
            return int(dims[axis].dim_value)
        return None
    return None


def set_graph_batch(source: Path, target: Path, size: int | None, axes: dict | None = None) -> Path:
    """Copy of ``source`` with the batch dim of every input and output set to ``size`` (None: symbolic),
    on each one's sample axis (``axes``; absent: 0, None: a constant left as it is).

    Intermediate shapes (value_info) are dropped: they may carry the old batch, and ONNX Runtime infers
    them again. A graph that *computes* with its batch baked in (a Reshape to [1, -1]) still does after
    this; :func:`agrees_per_sample` is what tells."""
    import onnx

    model = onnx.load(str(source))
    initializers = {init.name for init in model.graph.initializer}
    if size is None:
        _relax_reshapes(model, graph_batch(source, axes))
    for value in [*model.graph.input, *model.graph.output]:
        axis = (axes or {}).get(value.name, 0)
        if value.name in initializers or axis is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) <= axis:
            continue
        dims[axis].Clear()
        if size is None:
            dims[axis].dim_param = "batch"
        else:
            dims[axis].dim_value = size
    del model.graph.value_info[:]
    onnx.save(model, str(target))
    return target


def _relax_reshapes(model, traced: int | None) -> int:
    """Let Reshapes with a traced batch in their constant target shape follow the input's batch.

    ``torch.export`` at batch 1 turns ``x.flatten(1)`` into ``Reshape(x, [1, 32])``; ONNX's Reshape
    copies the input's dimension where the target says 0, so ``[0, 32]`` works at every batch. Only
    shapes whose first entry equals the traced batch change, and the result is checked numerically
    afterwards (a Reshape that moves the batch elsewhere fails that check and the batch stays fixed).
    Returns how many Reshapes changed."""
    from onnx import numpy_helper

    if not traced:
        return 0
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        tensor = constants[node.input[1]]
        shape = numpy_helper.to_array(tensor).copy()
        if shape.ndim != 1 or not len(shape) or shape[0] != traced or (shape == 0).any():
            continue
        # The exporter writes allowzero=1 (a 0 would mean an empty dimension); the target holds no 0,
        # so allowzero=0 changes nothing but the entry rewritten here.
        for attribute in node.attribute:
            if attribute.name == "allowzero":
                attribute.i = 0
        shape[0] = 0
        tensor.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), tensor.name))
        changed += 1
    return changed


def relative_deviation(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    """Largest |a - b| over every output, relative to that output's range (inf on a shape mismatch)."""
    worst = 0.0
    for a, b in zip(first, second):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return float("inf")
        if a.dtype.kind not in "fc":
            worst = max(worst, 0.0 if np.array_equal(a, b) else float("inf"))
            continue
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            worst = max(worst, 0.0 if np.array_equal(a, b, equal_nan=True) else float("inf"))
            continue
        scale = max(float(np.max(a) - np.min(a)) if a.size else 0.0, float(np.max(np.abs(a))) if a.size else 0.0, 1e-6)
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))) / scale if a.size else 0.0)
    return worst


def agrees_per_sample(backend: Backend, reference: list[np.ndarray], feeds: dict[str, np.ndarray],
                      tolerance: float = 1e-3) -> str | None:
    """None when ``backend`` gives the ``reference`` outputs at batch 1 and with all samples in one batch;
    else why not."""
    from .evaluation import run_in_batches  # the agent's splitter (evaluation imports this module)

    try:
        count = backend.count(feeds)
        alone = run_in_batches(backend, feeds, max_batch=1)
        together = run_in_batches(backend, feeds, max_batch=count)
    except Exception as exc:  # noqa: BLE001 - any failure means the dynamic batch does not work
        from edgepack.errors import first_line

        return f"it fails at batch {backend.count(feeds)} ({first_line(exc, 160)})"
    for label, got in (("1", alone), (str(count), together)):
        deviation = relative_deviation(reference, got)
        if deviation > tolerance:
            return f"at batch {label} its outputs differ from the original's (relative deviation {deviation:.3g})"
    return None


def batch_invariance(backend: Backend, feeds: dict[str, np.ndarray]) -> tuple[bool, float]:
    """(invariant, deviation): does each sample's output stay the same inside a batch as alone?

    A batch-1 model runs every sample alone anyway: invariant by construction."""
    if not backend.batched or backend.batch_size == 1:
        return True, 0.0
    from .evaluation import run_in_batches  # the agent's splitter (evaluation imports this module)

    count = backend.count(feeds)
    alone = run_in_batches(backend, feeds, max_batch=1)
    together = run_in_batches(backend, feeds, max_batch=count)
    deviation = relative_deviation(alone, together)
    return deviation <= INVARIANCE_TOLERANCE, deviation
