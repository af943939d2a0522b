"""Where each tensor of a graph holds its samples, which inputs are constants, and which outputs are a
state that feeds an input on the next call.

Not every model has its batch on axis 0 of every input. A streaming voice-activity model takes
``input [batch, samples]``, a recurrent ``state [2, batch, 128]`` and a rank-0 sample rate, and returns
a probability and the next state. The batch axis of each input is found from the symbolic dimensions
the graph shares between its inputs (``batch`` on axis 0 of one and axis 1 of another); where the graph
names none, from which dimension is dynamic. Outputs are settled by running the model at two batch
sizes and seeing which axis follows. Users can say it (``--batch-axis state=1``, ``--constant
sr=16000``, ``--state stateN=state``) and what they say wins.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from edgepack.errors import UsageError
from edgepack.tensors import TensorSpec

#: name parts that mark an input/output pair as "this call's state" / "the next call's state"
STATE_AFFIXES = frozenset({"in", "out", "input", "output", "new", "next", "prev", "previous", "old", "n", "t",
                           "tm1", "tp1", "0", "1"})


def parse_batch_axes(values) -> dict[str, int | None]:
    """``--batch-axis NAME=AXIS`` (``none``: a constant) into {name: axis}."""
    axes = {}
    for value in values or ():
        name, sep, axis = value.partition("=")
        if not sep or not name:
            raise UsageError(f"--batch-axis {value!r} is malformed; use NAME=AXIS (e.g. state=1) or NAME=none")
        if axis.strip().lower() in ("none", "null", "-"):
            axes[name] = None
            continue
        try:
            axes[name] = int(axis)
        except ValueError:
            raise UsageError(f"--batch-axis {value!r}: the axis must be a whole number or 'none'") from None
        if axes[name] < 0:
            raise UsageError(f"--batch-axis {value!r}: the axis must be 0 or more")
    return axes


def parse_constants(values) -> dict[str, list | float | int]:
    """``--constant NAME=VALUE`` (a number, or comma-separated numbers) into {name: value}."""
    constants = {}
    for value in values or ():
        name, sep, text = value.partition("=")
        if not sep or not name or not text:
            raise UsageError(f"--constant {value!r} is malformed; use NAME=VALUE (e.g. sr=16000)")
        try:
            numbers = [float(part) if any(c in part for c in ".eE") or part.strip().lower() in ("nan", "inf") else int(part)
                       for part in text.split(",")]
        except ValueError:
            raise UsageError(f"--constant {value!r}: the value must be a number or comma-separated numbers") from None
        constants[name] = numbers[0] if len(numbers) == 1 else numbers
    return constants


def parse_state(values) -> dict[str, str]:
    """``--state OUTPUT=INPUT`` (the output feeds the input on the next call) into {output: input}."""
    state = {}
    for value in values or ():
        output, sep, feeds = value.partition("=")
        if not sep or not output or not feeds:
            raise UsageError(f"--state {value!r} is malformed; use OUTPUT=INPUT (e.g. stateN=state)")
        state[output] = feeds
    return state


def graph_dims(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    """Each input's and output's dimensions as the graph declares them: int, symbol name or None."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def dims(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in value.type.tensor_type.shape.dim]

    return ({v.name: dims(v) for v in model.graph.input if v.name not in initializers},
            {v.name: dims(v) for v in model.graph.output})


def batch_symbol(inputs: dict[str, list]) -> str | None:
    """The batch: the symbolic dimension on axis 0 of some input that the most inputs share, if two or
    more share it (``seq`` of ``ids [1, seq]`` and ``mask [1, seq]`` is no batch: never on axis 0)."""
    leading = {dims[0] for dims in inputs.values() if dims and isinstance(dims[0], str)}
    counts = Counter(symbol for dims in inputs.values() for symbol in set(d for d in dims if isinstance(d, str))
                     if symbol in leading)
    if not counts:
        return None
    shared = max(counts.values())
    symbol = sorted(s for s, c in counts.items() if c == shared)[0]  # deterministic among ties
    return symbol if shared >= 2 else None


def axis_of(dims: list, symbol: str | None, batch_elsewhere: bool, dynamic_batch: bool = True) -> int | None:
    """Where a tensor with ``dims`` holds its samples (None: a constant). ``dynamic_batch``: some
    input's axis 0 is dynamic, so a tensor with a fixed axis 0 and one dynamic axis holds its samples
    there (``state [2, ?, 128]``); in a graph exported at a fixed batch every axis 0 is the batch."""
    if not dims:
        return None
    if symbol is not None and symbol in dims:
        return dims.index(symbol)
    dynamic = [axis for axis, d in enumerate(dims) if not isinstance(d, int)]
    if 0 in dynamic:
        return 0
    if len(dynamic) == 1 and dynamic_batch:
        return dynamic[0]
    if not dynamic and batch_elsewhere and symbol is not None:
        return None  # fully fixed beside inputs with a symbolic batch: the same for every sample
    return 0


def detect_input_axes(path: Path) -> dict[str, int | None]:
    """The sample axis of every graph input (see the module docstring)."""
    inputs, _ = graph_dims(path)
    symbol = batch_symbol(inputs)
    dynamic_batch = any(dims and not isinstance(dims[0], int) for dims in inputs.values())
    return {name: axis_of(dims, symbol, True, dynamic_batch) for name, dims in inputs.items()}


def graph_output_axes(path: Path, input_axes: dict[str, int | None]) -> dict[str, int | None]:
    """The outputs' sample axes as far as the graph tells (the inputs' batch symbol, else dim 0)."""
    inputs, outputs = graph_dims(path)
    symbols = {dims[axis] for name, dims in inputs.items()
               if (axis := input_axes.get(name)) is not None and axis < len(dims) and isinstance(dims[axis], str)}
    axes = {}
    for name, dims in outputs.items():
        shared = next((axis for axis, d in enumerate(dims) if d in symbols), None)
        axes[name] = shared if shared is not None else (0 if dims else None)
    return axes


def output_axes_from_runs(one: list[np.ndarray], two: list[np.ndarray], names: list[str],
                          fallback: dict[str, int | None]) -> dict[str, int | None]:
    """Each output's sample axis from its shapes at batch 1 and 2: the one axis that grew from 1 to 2
    (none: a constant output); ``fallback`` where the shapes do not tell."""
    axes = {}
    for name, a, b in zip(names, one, two):
        a, b = np.shape(a), np.shape(b)
        grew = [axis for axis, (x, y) in enumerate(zip(a, b)) if (x, y) == (1, 2)] if len(a) == len(b) else []
        if len(grew) == 1:
            axes[name] = grew[0]
        elif len(a) == len(b) and a == b and not any(d == 1 for d in a):
            axes[name] = None
        else:
            axes[name] = fallback.get(name, 0)
    return axes


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^0-9a-z]+", name.lower()) if t]


def _same_state(output: str, feeds: str) -> bool:
    """``stateN``/``state``, ``h_out``/``h_in``, ``new_cache``/``cache``: the names differ only by a
    marker of time or direction (``x_recon``/``x`` does not: a reconstruction is no state)."""
    a, b = output.lower(), feeds.lower()
    if a == b:
        return False
    if a.startswith(b) and (a[len(b):].strip("_.-/") in STATE_AFFIXES):
        return True
    stem_a = [t for t in _tokens(a) if t not in STATE_AFFIXES]
    stem_b = [t for t in _tokens(b) if t not in STATE_AFFIXES]
    return bool(stem_a) and stem_a == stem_b


def detect_state(inputs: list[TensorSpec], outputs: list[TensorSpec], feeds: dict[str, np.ndarray],
                 results: list[np.ndarray]) -> dict[str, str]:
    """Outputs that are the next call's value of an input: the same dtype and shape on a run, and names
    that say so (``state`` / ``stateN``, ``h_in`` / ``h_out``, ``cache`` / ``new_cache``)."""
    state = {}
    for spec, result in zip(outputs, results):
        result = np.asarray(result)
        for candidate in inputs:
            value = feeds.get(candidate.name)
            if value is None or np.shape(value) != result.shape or np.asarray(value).dtype != result.dtype:
                continue
            if candidate.name in state.values():
                continue
            if _same_state(spec.name, candidate.name):
                state[spec.name] = candidate.name
                break
    return state


def run_sequence(run: Callable[[dict], list], steps: list[dict[str, np.ndarray]], outputs: list[TensorSpec],
                 state: dict[str, str]) -> list[np.ndarray]:
    """Run ``steps`` in order, each fed the previous step's ``state`` outputs in place of its own state
    inputs (the first step keeps its own); the outputs of every step, joined along each output's axis."""
    names = [spec.name for spec in outputs]
    carried: dict[str, np.ndarray] = {}
    collected: list[list[np.ndarray]] = []
    for feeds in steps:
        result = [np.asarray(r) for r in run({**feeds, **carried})]
        collected.append(result)
        carried = {feeds_name: result[names.index(output)] for output, feeds_name in state.items()}
    joined = []
    for index, spec in enumerate(outputs):
        parts = [step[index] for step in collected]
        axis = spec.batch_axis
        joined.append(np.concatenate(parts, axis=axis) if axis is not None and axis < parts[0].ndim else parts[0])
    return joined


def leading(arrays: list[np.ndarray], specs: list[TensorSpec]) -> list[np.ndarray]:
    """Each array with its samples moved to axis 0 (what the gate and the statistics compare)."""
    moved = []
    for array, spec in zip(arrays, specs):
        array = np.asarray(array)
        axis = spec.batch_axis
        moved.append(np.moveaxis(array, axis, 0) if axis and axis < array.ndim else array)
    return moved
