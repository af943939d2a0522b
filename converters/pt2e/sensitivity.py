"""Where PT2E quantization hurts a PyTorch model most, measured rather than guessed.

The TFLite counterpart of ``converters.onnx.sensitivity`` (which works on ONNX QDQ graphs). The calibrated
PT2E model is converted to its quantize/dequantize form and run with ``torch.fx.Interpreter`` on a few
calibration samples, recording every quantization point: the float tensor that goes into a
``quantize`` op and what comes out of the matching ``dequantize``. The signal-to-quantization-noise
ratio of each point (``converters.onnx.sensitivity.sqnr_db``) is the error that point adds by itself.

A quantization point sits on an edge: it goes away only when the producer and every consumer of
the edge stay float (the producer's output and the consumers' inputs are what PT2E annotates). So each
point is reported with that group of nodes; a mixed recipe keeps the groups of the worst points float.
In squeeze-and-excitation networks the worst points are typically the SE gates and pooled vectors,
which a per-layer weight ranking misses.
"""

from __future__ import annotations

import copy

import numpy as np

from ..onnx.sensitivity import NodeSensitivity, sqnr_db


def _is_quantize(node) -> bool:
    return node.op == "call_function" and "quantize_per" in str(node.target) and "dequantize" not in str(node.target)


def _is_dequantize(node) -> bool:
    return node.op == "call_function" and "dequantize_per" in str(node.target)


def module_path(node) -> str:
    """The node's module path (``features.3.conv``) from torch.export's metadata, else its name."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return path.removeprefix("L['self'].") or node.name
    return node.name


def _op_name(node) -> str:
    if node.op == "get_attr":
        return "weight"
    parts = str(node.target).split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def _record(graph_module, wanted: set[str], samples: list[tuple]) -> dict[str, np.ndarray]:
    import torch

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.name in wanted and isinstance(value, torch.Tensor):
                seen.setdefault(n.name, []).append(value.detach().float().numpy().copy())
            return value

    seen: dict[str, list] = {}
    with torch.no_grad():
        for args in samples:
            Recorder(graph_module).run(*args)
    return {name: np.concatenate(values) if values[0].ndim else np.stack(values) for name, values in seen.items()}


def rank_points(prepared, samples: list[tuple]) -> list[NodeSensitivity]:
    """The quantization points of a calibrated PT2E model, the noisiest first.

    ``prepared``: the output of ``prepare_pt2e`` after calibration (not modified). ``samples``: argument
    tuples. Each item's ``group`` lists the nodes to keep float to remove that point; the model's own
    inputs are left out (int8 I/O is the point of the recipe).
    """
    from torchao.quantization.pt2e import quantize_pt2e

    converted = quantize_pt2e.convert_pt2e(copy.deepcopy(prepared), fold_quantize=False)
    points = []
    for node in converted.graph.nodes:
        if not _is_quantize(node):
            continue
        source = node.args[0]
        dequantized = [user for user in node.users if _is_dequantize(user)]
        if not dequantized:
            continue
        consumers = [c for dq in dequantized for c in dq.users if c.op == "call_function"]
        group = ([source.name] if source.op == "call_function" else []) + [c.name for c in consumers]
        if group:
            points.append((source, dequantized[0], list(dict.fromkeys(group))))
    values = _record(converted, {s.name for s, _, _ in points} | {d.name for _, d, _ in points}, samples)
    ranked = []
    for source, dequantized, group in points:
        if source.name in values and dequantized.name in values:
            owner = source if source.op == "call_function" else next(iter(dequantized.users))
            ranked.append(NodeSensitivity(module_path(owner), _op_name(source), float("inf"),
                                          sqnr_db(values[source.name], values[dequantized.name]), group))
    ranked.sort(key=lambda item: item.added_noise, reverse=True)
    return ranked
