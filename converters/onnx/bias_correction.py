"""Bias correction of a static int8 QDQ graph (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Rounding a layer's weights to int8 changes what the layer computes on average: for a convolution,
E[conv(x, Wq)] - E[conv(x, W)] = conv(E[x], Wq - W) (the convolution is linear), a per-channel shift that
every later layer inherits. Depthwise 3x3 kernels have only 9 weights per channel, so their rounding
errors do not average out, and on real pretrained MobileNet/EfficientNet-class networks this shift alone
costs several points of agreement. The correction measures E[x] (the mean input map of each layer) on
the calibration data with the float graph and subtracts the shift from the layer's int32 bias, so the
int8 chain stays exactly as fused and fast as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class _Layer:
    node: str
    op: str
    input: str  # the float graph's name of the layer's input tensor
    weight: np.ndarray  # float weights
    dequantized: np.ndarray  # what the int8 graph computes with
    bias_quantized: str  # name of the int32 bias initializer in the QDQ graph
    bias_scale: np.ndarray
    attributes: dict


def correct_biases(float_path: Path, qdq_path: Path, target: Path, batches: list[dict]) -> dict:
    """Write ``qdq_path`` with corrected int32 biases to ``target``; return what was corrected.

    ``batches`` are calibration feeds for the float graph. Layers without a bias or whose weights are
    not a DequantizeLinear of an int8 initializer are left as they are.
    """
    import onnx
    from onnx import numpy_helper

    qdq = onnx.load(str(qdq_path))
    floating = onnx.load(str(float_path))
    layers = _layers(floating, qdq)
    if not layers:
        onnx.save(qdq, str(target))
        return {"layers": 0}
    means = _input_means(floating, [layer.input for layer in layers], batches)
    initializers = {init.name: init for init in qdq.graph.initializer}
    shifts = []
    for layer in layers:
        mean = means.get(layer.input)
        if mean is None:
            continue
        shift = _output_shift(layer, mean)
        if not np.isfinite(shift).all() or not (np.abs(layer.bias_scale) > 0).all():
            continue
        bias = initializers[layer.bias_quantized]
        values = numpy_helper.to_array(bias).astype(np.int64)
        info = np.iinfo(np.int32)
        corrected = np.clip(values - np.round(shift / layer.bias_scale), info.min, info.max).astype(np.int32)
        bias.CopyFrom(numpy_helper.from_array(corrected, bias.name))
        shifts.append(float(np.abs(shift).max()))
    onnx.save(qdq, str(target))
    return {"layers": len(shifts), "max_shift": round(max(shifts, default=0.0), 6)}


def _layers(floating, qdq) -> list[_Layer]:
    from onnx import numpy_helper

    float_nodes = {node.name: node for node in floating.graph.node if node.name}
    float_inits = {init.name: init for init in floating.graph.initializer}
    inits = {init.name: init for init in qdq.graph.initializer}
    producers = {out: node for node in qdq.graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in qdq.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    layers = []
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.name not in float_nodes:
            continue
        original = float_nodes[node.name]
        if original.op_type != node.op_type or len(original.input) < 2 or original.input[1] not in float_inits:
            continue
        weight_dq, bias_dq = producers.get(node.input[1]), producers.get(node.input[2])
        if not _dequantizes_initializer(weight_dq, inits) or not _dequantizes_initializer(bias_dq, inits):
            continue
        if readers.get(node.input[2], 0) > 1 or readers.get(bias_dq.input[0], 0) > 1:
            continue  # a bias shared by several layers cannot take each one's correction
        attributes = {a.name: _attribute(a) for a in node.attribute}
        if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue  # implicit padding: the mean map cannot be padded the same way here
        if node.op_type == "Gemm" and (attributes.get("transA") or attributes.get("alpha", 1.0) != 1.0):
            continue
        weight = numpy_helper.to_array(float_inits[original.input[1]]).astype(np.float64)
        dequantized = _dequantize(weight_dq, inits)
        if dequantized.shape != weight.shape:
            continue
        bias_scale = numpy_helper.to_array(inits[bias_dq.input[1]]).astype(np.float64)
        layers.append(_Layer(node.name, node.op_type, original.input[0], weight, dequantized, bias_dq.input[0],
                             bias_scale, attributes))
    return layers


def _dequantizes_initializer(node, inits) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and all(name in inits for name in node.input[:2])


def _dequantize(node, inits) -> np.ndarray:
    from onnx import numpy_helper

    values = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if np.ndim(scale) == 1 and scale.size > 1:
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
    return (values - zero) * scale


def _attribute(attribute):
    from onnx import helper

    return helper.get_attribute_value(attribute)


def _input_means(floating, names: list[str], batches: list[dict]) -> dict[str, np.ndarray]:
    """Mean over the calibration samples of each named tensor (per position: a C,H,W map for a conv)."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(floating)
    graph_inputs = {i.name for i in model.graph.input}
    existing = {o.name for o in model.graph.output}
    wanted = list(dict.fromkeys(names))
    for name in wanted:
        if name not in existing and name not in graph_inputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    # Without graph optimizations the tensors keep the names the layers read them by.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fetch = [name for name in wanted if name not in graph_inputs]
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    # A graph with a fixed batch takes only full batches: those shaped as the first one. Compared by
    # every input's whole shape, not the length of the first: an input may be a scalar or hold its
    # samples on another axis (a recurrent state), and a sum's shape must not change between batches.
    shapes = _shapes(batches[0]) if batches else None
    for feeds in (feeds for feeds in batches if _shapes(feeds) == shapes):
        values = dict(zip(fetch, session.run(fetch, feeds)))
        values.update({name: feeds[name] for name in wanted if name in graph_inputs})
        for name in wanted:
            array = np.asarray(values[name], dtype=np.float64)
            # Rows, not samples: a Gemm may read a reshaped (batch x tokens, K) tensor.
            sums[name] = sums.get(name, 0.0) + array.sum(axis=0)
            rows[name] = rows.get(name, 0) + array.shape[0]
    return {name: total / max(rows[name], 1) for name, total in sums.items()}


def _shapes(feeds: dict) -> tuple:
    return tuple((name, np.shape(array)) for name, array in feeds.items())


def _output_shift(layer: _Layer, mean: np.ndarray) -> np.ndarray:
    """Per-output-channel mean of conv(E[x], Wq - W) (or E[x] @ (Wq - W) for Gemm)."""
    delta = layer.dequantized - layer.weight
    if layer.op == "Gemm":
        delta = delta.T if layer.attributes.get("transB") else delta
        return mean.reshape(-1) @ delta
    import torch

    spatial = mean.ndim - 1
    pads = list(layer.attributes.get("pads", [0] * (2 * spatial)))  # ONNX: (begin..., end...)
    return conv_mean_shift(torch.from_numpy(mean), torch.from_numpy(delta),
                           list(layer.attributes.get("strides", [1] * spatial)), pads[:spatial], pads[spatial:],
                           list(layer.attributes.get("dilations", [1] * spatial)),
                           int(layer.attributes.get("group", 1))).numpy()


def conv_mean_shift(mean, delta, strides, pads_begin, pads_end, dilations, groups: int):
    """Per-output-channel mean of conv(mean, delta): the average output shift a weight change ``delta``
    causes on inputs whose mean map is ``mean`` (C, *spatial). Shared by the ONNX and PT2E passes."""
    import torch.nn.functional as F

    spatial = mean.dim() - 1
    # F.pad takes (last dim begin, end, previous dim begin, end, ...).
    x = F.pad(mean[None], [value for pair in zip(reversed(pads_begin), reversed(pads_end)) for value in pair])
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    out = conv(x, delta, None, list(strides), 0, list(dilations), groups)
    return out[0].reshape(out.shape[1], -1).mean(dim=1)
