"""Bias correction of a PT2E-quantized PyTorch graph before it becomes a full-integer TFLite model.

The same correction as ``converters.onnx.bias_correction`` (Nagel et al. 2019), on the graph
``convert_pt2e(..., fold_quantize=False)`` returns: there every convolution and linear layer reads its
weight through ``dequantize_per_channel(quantize_per_channel(W))``, so the int8 weights the TFLite model
will hold are known exactly. The mean input of each layer is measured on the calibration data by
running that graph; the mean output shift ``conv(E[x], Wq - W)`` is subtracted from the layer's float
bias, which litert-torch then quantizes to int32 as before. The graph keeps its structure: the fully
integer XNNPACK path and the model size do not change.
"""

from __future__ import annotations

import torch

from .sensitivity import _is_dequantize, _is_quantize

_LAYERS = {"aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default"}


def correct_if_better(converted: torch.fx.GraphModule, original, samples, checks) -> dict:
    """Correct the biases, then keep the correction only if the quantized graph's outputs on ``checks``
    (tuples of input tensors) came closer to ``original``'s. On a graph with float islands (the mixed
    recipe) the fake-quantized graph measured here and the TFLite model can differ, so this is a guard
    measured on the graph, not a promise about the TFLite file; the gate still judges that file.
    A graph the correction cannot handle is left exactly as it was."""
    originals: dict = {}

    def restore():
        for target, value in originals.items():
            _set_attr(converted, target, value)

    with torch.no_grad():
        expected = [_leaves(original(*sample)) for sample in checks]
        before = _error(converted, checks, expected)
        try:
            info = correct_pt2e_biases(converted, samples, originals)
        except Exception as exc:  # noqa: BLE001 - a graph this pass does not understand: leave it as it was
            restore()
            return {"layers": 0, "kept": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
        after = _error(converted, checks, expected)
        if not after <= before:  # worse, or not a number
            restore()
            return {"layers": 0, "kept": False, "error_before": before, "error_after": after}
    return info | {"kept": True, "error_before": before, "error_after": after}


def _leaves(value) -> list:
    from torch.utils._pytree import tree_leaves

    return [leaf.detach().double() for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _error(module, checks, expected) -> float:
    total, count = 0.0, 0
    for sample, reference in zip(checks, expected):
        for got, want in zip(_leaves(module(*sample)), reference):
            total += float((got - want).abs().sum())
            count += want.numel()
    return total / max(count, 1)


def correct_pt2e_biases(converted: torch.fx.GraphModule, samples, originals: dict | None = None) -> dict:
    """Correct the biases of ``converted`` from ``samples`` (tuples of input tensors). Each corrected
    bias is a new tensor; ``originals`` (when given) receives the ones it replaced, by target."""
    layers = []
    for node in converted.graph.nodes:
        if node.op != "call_function" or str(node.target) not in _LAYERS or len(node.args) < 3:
            continue
        weight_dq, bias = node.args[1], node.args[2]
        if not (_is_dequantize(weight_dq) and _is_quantize(weight_dq.args[0])):
            continue
        if getattr(bias, "op", None) != "get_attr" or getattr(weight_dq.args[0].args[0], "op", None) != "get_attr":
            continue
        layers.append(node)
    # A bias several layers read (a module called twice) cannot take each one's correction.
    users: dict = {}
    for node in layers:
        users[node.args[2].target] = users.get(node.args[2].target, 0) + 1
    layers = [node for node in layers if users[node.args[2].target] == 1]
    if not layers:
        return {"layers": 0}
    watched = {node.args[0] for node in layers}
    sums: dict = {}
    rows: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in watched:
                total = value.detach().double().sum(dim=0)
                sums[n] = sums[n] + total if n in sums else total
                # Rows, not samples: a linear layer may read a (tokens, K) tensor at batch 1.
                rows[n] = rows.get(n, 0) + value.shape[0]
            return value

    with torch.no_grad():
        for sample in samples:
            Recorder(converted).run(*sample)
    shifts = []
    originals = {} if originals is None else originals
    with torch.no_grad():
        for node in layers:
            if node.args[0] not in sums:
                continue
            mean = sums[node.args[0]] / max(rows[node.args[0]], 1)
            weight_dq = node.args[1]
            float_weight = _attr(converted, weight_dq.args[0].args[0].target)
            dequantized = _dequantize(converted, weight_dq, float_weight)
            delta = (dequantized.double() - float_weight.double())
            if str(node.target) == "aten.linear.default":
                shift = mean.reshape(-1, delta.shape[1]).mean(dim=0) @ delta.T
            else:
                shift = _conv_shift(node, mean, delta)
            bias = _attr(converted, node.args[2].target)
            if shift is None or bias.shape != shift.shape or not torch.isfinite(shift).all():
                continue
            # A new tensor, never an in-place change: the graph's bias may be the source module's own
            # parameter (torch.export shares them), which later recipes convert again.
            originals.setdefault(node.args[2].target, bias)
            _set_attr(converted, node.args[2].target, bias.detach() - shift.to(bias.dtype))
            shifts.append(float(shift.abs().max()))
    return {"layers": len(shifts), "max_shift": round(max(shifts, default=0.0), 6)}


def _attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _set_attr(module, target: str, value) -> None:
    *path, name = target.split(".")
    for part in path:
        module = getattr(module, part)
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, value)


def _value(module, arg):
    return _attr(module, arg.target) if getattr(arg, "op", None) == "get_attr" else arg


def _dequantize(module, weight_dq, float_weight):
    """Run the weight's quantize/dequantize pair on the float weight: the weights TFLite will hold."""
    quantize = weight_dq.args[0]
    quantized = quantize.target(float_weight, *(_value(module, a) for a in quantize.args[1:]), **quantize.kwargs)
    return weight_dq.target(quantized, *(_value(module, a) for a in weight_dq.args[1:]), **weight_dq.kwargs)


def _conv_shift(node, mean, delta):
    """The layer's mean output shift, or None for string padding ("same"/"valid"), left uncorrected."""
    from ..onnx.bias_correction import conv_mean_shift

    args = list(node.args) + [None] * (7 - len(node.args))
    spatial = delta.dim() - 2
    padding = args[4] if args[4] is not None else [0] * spatial
    if isinstance(padding, str):
        return None
    padding = list(padding) * (spatial if len(padding) == 1 else 1)
    return conv_mean_shift(mean, delta, args[3] or [1] * spatial, padding, padding, args[5] or [1] * spatial,
                           args[6] or 1)
