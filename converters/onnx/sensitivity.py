"""Per-layer quantization sensitivity, measured rather than guessed.

Both the fp32 graph and the fully quantized QDQ graph are run on calibration samples with every
intermediate tensor exposed. For each quantizable node, the signal-to-quantization-noise ratio (SQNR,
in dB) of its output against the fp32 graph is compared with the SQNR of its inputs: the drop is the
error that node itself adds (its weight quantization and the quantization of its inputs). Nodes are
ranked by that drop, so a layer fed by a huge-range activation, or a depthwise convolution with
badly spread per-channel ranges, comes first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUANTIZABLE = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool",
               "GlobalAveragePool", "MaxPool", "Relu", "Clip", "Sigmoid", "HardSigmoid", "Resize", "Softmax"}


@dataclass
class NodeSensitivity:
    """The error one node (with any node the quantizer fused into it) adds when quantized."""

    node: str
    op_type: str
    sqnr_in_db: float
    sqnr_out_db: float
    group: list[str]

    @property
    def added_noise(self) -> float:
        """Noise power the node adds, relative to the signal: 10^(-out/10) - 10^(-in/10)."""
        return max(0.0, _noise(self.sqnr_out_db) - _noise(self.sqnr_in_db))

    @property
    def added_db(self) -> float:
        """The added noise as an SQNR in dB (lower is worse; +inf when nothing is added)."""
        return math.inf if self.added_noise <= 0 else -10 * math.log10(self.added_noise)


def _noise(sqnr: float) -> float:
    if sqnr == math.inf:
        return 0.0
    if sqnr == -math.inf:
        return math.inf
    return 10 ** (-sqnr / 10)


def sqnr_db(reference: np.ndarray, observed: np.ndarray) -> float:
    """Signal-to-noise ratio in dB, averaged over channels (axis 1); +inf when identical.

    Averaging the relative noise per channel matters: one huge-range channel would otherwise hide
    small channels that quantization wipes out (their noise is tiny next to the huge signal).
    """
    reference = reference.astype(np.float64)
    observed = observed.astype(np.float64)
    if reference.ndim >= 2:
        reference = np.moveaxis(reference, 1, 0).reshape(reference.shape[1], -1)
        observed = np.moveaxis(observed, 1, 0).reshape(observed.shape[1], -1)
    else:
        reference, observed = reference.reshape(1, -1), observed.reshape(1, -1)
    noise = np.sum((reference - observed) ** 2, axis=1)
    signal = np.sum(reference**2, axis=1)
    if not np.isfinite(noise).all():
        return -math.inf
    if float(noise.sum()) == 0:
        return math.inf
    live = signal > 0
    ratios = np.where(live, noise / np.where(live, signal, 1), np.where(noise > 0, 1.0, 0.0))
    mean = float(ratios.mean())
    return math.inf if mean == 0 else -10 * math.log10(mean)


def _expose_all(path: Path, target: Path) -> list[str]:
    """Save a copy of the graph that also outputs every node output; return those tensor names."""
    import onnx

    model = onnx.load(str(path))
    existing = {output.name for output in model.graph.output}
    names = []
    for node in model.graph.node:
        for output in node.output:
            if output and output not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=output))
                existing.add(output)
                names.append(output)
    onnx.save(model, str(target))
    return names


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # No fusion: the tensor names of the graph must survive so both graphs can be matched.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, [output.name for output in session.get_outputs()]


class _Noise:
    """Per-channel sums of signal and noise power of one tensor pair, accumulated batch by batch (the
    SQNR :func:`sqnr_db` computes, without keeping any batch)."""

    __slots__ = ("noise", "signal", "finite")

    def __init__(self):
        self.noise = self.signal = None
        self.finite = True

    def add(self, reference: np.ndarray, observed: np.ndarray) -> None:
        reference, observed = reference.astype(np.float64), observed.astype(np.float64)
        if reference.ndim >= 2:
            reference = np.moveaxis(reference, 1, 0).reshape(reference.shape[1], -1)
            observed = np.moveaxis(observed, 1, 0).reshape(observed.shape[1], -1)
        else:
            reference, observed = reference.reshape(1, -1), observed.reshape(1, -1)
        noise, signal = np.sum((reference - observed) ** 2, axis=1), np.sum(reference**2, axis=1)
        if self.noise is not None and noise.shape != self.noise.shape:
            return  # another channel count in this batch: not the same tensor layout
        self.finite &= bool(np.isfinite(noise).all())
        self.noise = noise if self.noise is None else self.noise + noise
        self.signal = signal if self.signal is None else self.signal + signal

    def db(self) -> float:
        if not self.finite:
            return -math.inf
        if self.noise is None or float(self.noise.sum()) == 0:
            return math.inf
        live = self.signal > 0
        ratios = np.where(live, self.noise / np.where(live, self.signal, 1), np.where(self.noise > 0, 1.0, 0.0))
        mean = float(ratios.mean())
        return math.inf if mean == 0 else -10 * math.log10(mean)


def _stream(float_path: Path, qdq_path: Path, batches) -> tuple[dict[str, float], dict[str, float]]:
    """Run both exposed graphs batch by batch and accumulate, for every tensor of the float graph, its
    SQNR as the quantized graph consumes it, and for every tensor the quantized graph quantizes, the
    SQNR its own QDQ adds. Memory: one batch of each graph's tensors, whatever the number of batches."""
    float_session, float_names = _session(float_path)
    qdq_session, qdq_names = _session(qdq_path)
    consumed: dict[str, tuple[str, _Noise]] = {}
    quantizing: dict[str, _Noise] = {}
    first = True
    for feeds in batches:
        reference = {name: np.asarray(value) for name, value in zip(float_names, float_session.run(float_names, feeds))}
        quantized = {name: np.asarray(value) for name, value in zip(qdq_names, qdq_session.run(qdq_names, feeds))}
        if first:
            first = False
            for name, value in reference.items():
                if value.dtype.kind != "f":
                    continue
                # In the QDQ graph a quantized tensor T is consumed as T_DequantizeLinear_Output.
                for candidate in (f"{name}_DequantizeLinear_Output", name):
                    if candidate in quantized and quantized[candidate].shape == value.shape:
                        consumed[name] = (candidate, _Noise())
                        break
            for name, value in quantized.items():
                after = quantized.get(f"{name}_DequantizeLinear_Output")
                if value.dtype.kind == "f" and after is not None and after.shape == value.shape:
                    quantizing[name] = _Noise()
        for name, (candidate, noise) in consumed.items():
            if reference[name].shape == quantized[candidate].shape:
                noise.add(reference[name], quantized[candidate])
        for name, noise in quantizing.items():
            noise.add(quantized[name], quantized[f"{name}_DequantizeLinear_Output"])
        del reference, quantized
    return ({name: noise.db() for name, (_, noise) in consumed.items()},
            {name: noise.db() for name, noise in quantizing.items()})


def rank_nodes(float_model: Path, qdq_model: Path, batches: list[dict], workdir: Path) -> list[NodeSensitivity]:
    """Quantizable nodes of ``float_model`` ranked by the error each adds in ``qdq_model`` (worst first)."""
    import onnx

    float_exposed, qdq_exposed = workdir / "sens-float.onnx", workdir / "sens-qdq.onnx"
    _expose_all(float_model, float_exposed)
    _expose_all(qdq_model, qdq_exposed)
    consumed, quantizing = _stream(float_exposed, qdq_exposed, batches)
    graph = onnx.load(str(float_model), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    graph_inputs = {value.name for value in graph.input}

    def tensor_sqnr(name: str) -> float | None:
        """SQNR of a tensor as the quantized graph consumes it; None when the quantizer fused it away."""
        if name in graph_inputs:
            return math.inf
        return consumed.get(name)

    producers = {output: (node.name or f"{node.op_type}_{i}") for i, node in enumerate(graph.node) for output in node.output}

    consumers: dict[str, list[str]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(node.name or f"{node.op_type}_{i}")

    def input_quantization_noise(name: str) -> float:
        """Noise that quantizing tensor ``name`` itself adds (pre- vs post-QDQ in the quantized graph)."""
        return _noise(quantizing[name]) if name in quantizing else 0.0

    ranked = []
    pending: dict[str, list] = {}  # fused-away tensor -> the nodes (and input SQNR) that produced it
    for index, node in enumerate(graph.node):
        node_name = node.name or f"{node.op_type}_{index}"
        activations = [name for name in node.input if name and name not in initializers]
        group, sqnr_in = [], math.inf
        for name in activations:
            if name in pending:
                producers, fused_in = pending.pop(name)
                group += producers
                sqnr_in = min(sqnr_in, fused_in)
            else:
                value = tensor_sqnr(name)
                sqnr_in = min(sqnr_in, math.inf if value is None else value)
        if node.op_type not in QUANTIZABLE or not node.output:
            continue
        group.append(node_name)
        sqnr_out = tensor_sqnr(node.output[0])
        if sqnr_out is None:
            # e.g. Conv followed by Relu: the quantizer folds both into one quantized op; measure them together.
            pending[node.output[0]] = (group, sqnr_in)
            continue
        item = NodeSensitivity(node_name, node.op_type, sqnr_in, sqnr_out, group)
        # Keeping a node in float does not keep its *input* in float while the producer still quantizes
        # it: when quantizing an input is most of the error, the producer joins the group.
        for name in activations:
            if name in producers and input_quantization_noise(name) > 0.5 * item.added_noise:
                group.insert(0, producers[name])
        # Likewise for its output: while a consumer quantizes it, the tensor is not float.
        if input_quantization_noise(node.output[0]) > 0.5 * item.added_noise:
            group.extend(c for c in consumers.get(node.output[0], []) if c not in group)
        ranked.append(item)
    ranked.sort(key=lambda item: item.added_noise, reverse=True)
    return ranked


#: the nodes that carry weights and most of the time; the output-referred ranking measures these
COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def rank_by_output(float_model: Path, qdq_model: Path, batches: list[dict]) -> list[NodeSensitivity]:
    """Compute nodes ranked by the error quantizing each one *alone* causes at the model's outputs.

    For each Conv/ConvTranspose/Gemm/MatMul, the float graph is run with only that node quantized as
    ``qdq_model`` quantizes it (its dequantized weights, its activation inputs through the same
    QuantizeLinear/DequantizeLinear pair) and its outputs are compared with the float graph's.

    :func:`rank_nodes` measures the noise a node adds where it is; this measures what reaches the
    output, so the gain of the layers after it counts. The two differ most on high-resolution dense
    heads: on PP-OCRv4's text detector the stem's four convolutions each cost 11-15 dB at the output
    (the input quantization alone 21 dB) while adding little locally, and keeping 60 locally ranked
    layers float left the map's cosine at 0.55. ``sqnr_out_db`` is the output SQNR; ``group`` is the
    node and the elementwise chain after it up to the next compute node (requantized with it).
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    base = onnx.load(str(float_model))
    quantized = onnx.load(str(qdq_model))
    q_inits = {init.name: init for init in quantized.graph.initializer}
    activation_qdq = {node.input[0]: (node.input[1], node.input[2] if len(node.input) > 2 else "")
                      for node in quantized.graph.node if node.op_type == "QuantizeLinear" and node.input[0] not in q_inits}
    float_inits = {init.name for init in base.graph.initializer}
    dequantized = {}
    for node in quantized.graph.node:
        source = node.input[0] if node.op_type == "DequantizeLinear" else ""
        if source in q_inits and source.endswith("_quantized") and source[:-len("_quantized")] in float_inits:
            dequantized[source[:-len("_quantized")]] = _dequantize(node, q_inits, numpy_helper)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Basic optimizations only: one session per layer, and the full ones re-pack every weight each time.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC

    def run(model) -> list[list[np.ndarray]]:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [session.run(None, feeds) for feeds in batches]

    reference = run(base)
    consumers: dict[str, list] = {}
    for node in base.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ranked = []
    for index, node in enumerate(base.graph.node):
        if node.op_type not in COMPUTE:
            continue
        name = node.name or f"{node.op_type}_{index}"
        model = onnx.ModelProto()
        model.CopyFrom(base)
        target = model.graph.node[index]
        inserted = []
        for position, tensor in enumerate(node.input):
            if tensor in dequantized:
                model.graph.initializer.append(numpy_helper.from_array(dequantized[tensor], f"{tensor}__sens"))
                target.input[position] = f"{tensor}__sens"
            elif tensor in activation_qdq:
                scale, zero = activation_qdq[tensor]
                for extra in (scale, zero):
                    if extra:
                        model.graph.initializer.append(q_inits[extra])
                pair = [scale, zero] if zero else [scale]
                tag = f"{index}_{position}"  # MatMul(x, x) quantizes x twice
                inserted += [helper.make_node("QuantizeLinear", [tensor, *pair], [f"{tensor}__q{tag}"]),
                             helper.make_node("DequantizeLinear", [f"{tensor}__q{tag}", *pair], [f"{tensor}__dq{tag}"])]
                target.input[position] = f"{tensor}__dq{tag}"
        if list(target.input) == list(node.input):
            continue  # the quantizer left this node float
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes[:index] + inserted + nodes[index:])
        _dedupe_initializers(model.graph)
        noises = [_Noise() for _ in reference[0]]
        for expected, observed in zip(reference, run(model)):
            for noise, a, b in zip(noises, expected, observed):
                if np.asarray(a).dtype.kind == "f":
                    noise.add(np.asarray(a), np.asarray(b))
        power = float(np.mean([_noise(noise.db()) for noise in noises]))
        sqnr = math.inf if power == 0 else (-math.inf if not math.isfinite(power) else -10 * math.log10(power))
        ranked.append(NodeSensitivity(name, node.op_type, math.inf, sqnr, [name, *_elementwise_tail(node, consumers)]))
    ranked.sort(key=lambda item: item.added_noise, reverse=True)
    return ranked


def _dequantize(node, initializers, numpy_helper) -> np.ndarray:
    values = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
    zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
    axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
    shape = [1] * values.ndim
    if scale.ndim and values.ndim:
        shape[min(axis % max(1, values.ndim), values.ndim - 1)] = -1
    return ((values - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)


def _dedupe_initializers(graph) -> None:
    seen, kept = set(), []
    for init in graph.initializer:
        if init.name not in seen:
            seen.add(init.name)
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _elementwise_tail(node, consumers) -> list[str]:
    """Names of the non-compute nodes fed, directly or through each other, by ``node`` alone."""
    tail, frontier, seen = [], list(node.output), set()
    while frontier:
        for user in consumers.get(frontier.pop(), []):
            if user.op_type in COMPUTE or user.name in seen or not user.name:
                continue
            seen.add(user.name)
            tail.append(user.name)
            frontier += list(user.output)
    return tail
