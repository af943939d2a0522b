"""Exact rewrites of the fp32 base graph (converters.onnx.simplify): scale/offset after a convolution
folded into it, hard-swish spellings fused into one HardSwish, nothing else touched."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.onnx.simplify import simplify


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _graph(opset: int, per_channel: bool, hardsigmoid: bool, shared_scale_output: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b"),
             numpy_helper.from_array((rng.uniform(0.5, 2, size=(1, 8, 1, 1)) if per_channel else np.array([1.7])).astype(np.float32), "a"),
             numpy_helper.from_array(np.array(0.3 if not per_channel else rng.normal(size=(8, 1, 1))).astype(np.float32), "c"),
             numpy_helper.from_array(np.array(3.0, np.float32), "three"), numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six"),
             numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Mul", ["a", "conv"], ["scaled"], name="lab_mul"),
             helper.make_node("Add", ["scaled", "c"], ["shifted"], name="lab_add")]
    if hardsigmoid:
        nodes += [helper.make_node("HardSigmoid", ["shifted"], ["gate"], alpha=1 / 6, beta=0.5),
                  helper.make_node("Mul", ["shifted", "gate"], ["act"])]
    else:
        nodes += [helper.make_node("Add", ["shifted", "three"], ["plus3"]),
                  helper.make_node("Clip", ["plus3", "zero", "six"], ["clipped"]),
                  helper.make_node("Mul", ["shifted", "clipped"], ["prod"]),
                  helper.make_node("Div", ["prod", "six"], ["act"])]
    nodes.append(helper.make_node("Conv", ["act", "w2"], ["y"], name="conv2"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])]
    if shared_scale_output:
        outputs.append(helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [1, 8, 16, 16]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("hardsigmoid", [False, True])
def test_affine_folds_and_hardswish_fuses_exactly(per_channel, hardsigmoid):
    model = _graph(14, per_channel, hardsigmoid)
    x = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32) * 2
    expected = _run(model, x)
    counts = simplify(model)
    onnx.checker.check_model(model)
    assert counts == {"conv_affine_folded": 1, "hardswish_fused": 1}
    assert [node.op_type for node in model.graph.node] == ["Conv", "HardSwish", "Conv"]
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-5, atol=1e-5)
    # The replaced weights are not left behind (they would be shipped in the bundle).
    assert {init.name for init in model.graph.initializer}.isdisjoint({"w", "b", "a", "c", "three"})


def test_a_tensor_the_graph_outputs_is_kept():
    model = _graph(14, False, False, shared_scale_output=True)  # the scaled tensor is also a graph output
    x = np.random.default_rng(2).normal(size=(1, 3, 16, 16)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    before = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    simplify(model)
    onnx.checker.check_model(model)
    # Conv and Mul fold (the folded conv now writes the output tensor); the Add after it does not.
    assert [node.op_type for node in model.graph.node][:2] == ["Conv", "Add"]
    after = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_no_hardswish_before_opset_14():
    model = _graph(13, False, False)
    counts = simplify(model)
    assert counts == {"conv_affine_folded": 1}
    assert "HardSwish" not in {node.op_type for node in model.graph.node}


def test_initializers_listed_as_inputs_are_not_constants():
    """A weight also listed as a graph input (torch's keep_initializers_as_inputs) may be overridden by
    the caller: it is not folded, and the graph keeps running without it being fed."""
    model = _graph(14, False, False)
    for name in ("w", "a"):
        init = next(i for i in model.graph.initializer if i.name == name)
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(init.dims)))
    x = np.random.default_rng(3).normal(size=(1, 3, 16, 16)).astype(np.float32)
    expected = _run(model, x)
    counts = simplify(model)
    assert counts["conv_affine_folded"] == 0
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-5, atol=1e-5)


def test_graphs_with_subgraphs_are_left_alone():
    model = _graph(14, False, False)
    branch = helper.make_graph([helper.make_node("Identity", ["conv"], ["branch_out"])], "then", [],
                               [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)])
    model.graph.node.append(helper.make_node("If", ["flag"], ["picked"], then_branch=branch, else_branch=branch))
    assert simplify(model) == {"conv_affine_folded": 0}
    assert "Mul" in {node.op_type for node in model.graph.node}
