"""Samples on each tensor's own axis: detection from the graph, the one splitter, data, the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from agent.runtime.base import Backend, run_in_batches
from converters import layout
from converters.data import load_dataset, random_dataset
from edgepack.bundle.manifest import TensorEntry, check_manifest
from edgepack.errors import BundleError, DataError, UsageError
from edgepack.tensors import TensorSpec


def _graph(tmp_path, dims: dict, outputs: dict, name="m.onnx"):
    """A graph with the given input dims (int, symbol or None) whose outputs are Identity copies."""
    import onnx
    from onnx import TensorProto, helper

    def info(key, shape):
        return helper.make_tensor_value_info(key, TensorProto.FLOAT, [d if d is not None else None for d in shape])

    sources = list(dims)
    nodes = [helper.make_node("Identity", [sources[i % len(sources)]], [key]) for i, key in enumerate(outputs)]
    graph = helper.make_graph(nodes, "g", [info(k, v) for k, v in dims.items()], [info(k, v) for k, v in outputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_batch_axes_come_from_the_symbol_the_inputs_share(tmp_path):
    path = _graph(tmp_path, {"input": ["batch", "sequence"], "state": [2, "batch", 128], "sr": []},
                  {"output": ["batch", 1], "stateN": [2, "batch", 128]})
    assert layout.detect_input_axes(path) == {"input": 0, "state": 1, "sr": None}
    assert layout.graph_output_axes(path, {"input": 0, "state": 1}) == {"output": 0, "stateN": 1}


def test_without_symbols_the_dynamic_dimension_is_the_batch(tmp_path):
    path = _graph(tmp_path, {"input": [None, None], "state": [2, None, 128], "sr": []}, {"output": [None, 1]})
    assert layout.detect_input_axes(path) == {"input": 0, "state": 1, "sr": None}
    fixed = _graph(tmp_path, {"x": [1, 3, 8, 8]}, {"y": [1, 10]}, "fixed.onnx")
    assert layout.detect_input_axes(fixed) == {"x": 0}
    # A fully fixed table beside inputs with a symbolic batch is a constant.
    table = _graph(tmp_path, {"x": ["n", 4], "ids": ["n", 2], "table": [10, 4]}, {"y": ["n", 4]}, "table.onnx")
    assert layout.detect_input_axes(table) == {"x": 0, "ids": 0, "table": None}


def test_output_axes_follow_the_runs():
    one = [np.zeros((1, 1)), np.zeros((2, 1, 128)), np.zeros((3,))]
    two = [np.zeros((2, 1)), np.zeros((2, 2, 128)), np.zeros((3,))]
    assert layout.output_axes_from_runs(one, two, ["p", "s", "c"], {}) == {"p": 0, "s": 1, "c": None}


@pytest.mark.parametrize("output,feeds,expected", [
    ("stateN", "state", True), ("h_out", "h_in", True), ("new_cache", "cache", True), ("c_n", "c_0", True),
    ("x_recon", "x", False), ("output", "input", False), ("logits", "state", False),
])
def test_state_pairs_are_named_as_such(output, feeds, expected):
    inputs = [TensorSpec(feeds, "float32", (2, None, 4), batch_axis=1)]
    outputs = [TensorSpec(output, "float32", (2, None, 4), batch_axis=1)]
    value = np.zeros((2, 1, 4), np.float32)
    assert bool(layout.detect_state(inputs, outputs, {feeds: value}, [value.copy()])) is expected
    # The same names with another shape are no state.
    assert not layout.detect_state(inputs, outputs, {feeds: value}, [np.zeros((1, 4), np.float32)])


class _Recurrent(Backend):
    """state' = state + input.sum(per sample) * sr, output = state'.mean; samples on axis 1 of the state,
    a fixed batch when ``fixed``; records each run's batch."""

    def __init__(self, fixed=None):
        self.inputs = [TensorSpec("input", "float32", (fixed, 3)), TensorSpec("state", "float32", (2, fixed, 4), batch_axis=1),
                       TensorSpec("sr", "float32", ())]
        self.outputs = [TensorSpec("output", "float32", (fixed, 1)), TensorSpec("stateN", "float32", (2, fixed, 4), batch_axis=1)]
        self.runs = []

    def run(self, feeds):
        x, state, sr = feeds["input"], feeds["state"], feeds["sr"]
        assert state.shape[1] == x.shape[0] and sr.shape == ()
        self.runs.append(x.shape[0])
        new = state + (x.sum(axis=1) * sr)[None, :, None]
        return [new.mean(axis=(0, 2))[:, None], new]


def _feeds(count):
    rng = np.random.default_rng(0)
    return {"input": rng.standard_normal((count, 3)).astype(np.float32),
            "state": rng.standard_normal((2, count, 4)).astype(np.float32), "sr": np.array(2.0, np.float32)}


def test_the_splitter_cuts_each_tensor_on_its_own_axis_and_pads_a_fixed_batch():
    feeds = _feeds(7)
    whole = _Recurrent().run(feeds)
    dynamic = _Recurrent()
    for got, want in zip(run_in_batches(dynamic, feeds, max_batch=3), whole):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert dynamic.runs == [3, 3, 1]
    fixed = _Recurrent(fixed=4)
    outputs = run_in_batches(fixed, feeds)
    assert fixed.runs == [4, 4] and outputs[1].shape == (2, 7, 4)
    for got, want in zip(outputs, whole):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_checks_count_samples_on_each_axis_and_fill_constants():
    backend = _Recurrent()
    backend.set_layout({}, {"sr": 16000})
    checked = backend.check_feeds({"input": np.zeros((2, 3)), "state": np.zeros((2, 2, 4))})
    assert checked["sr"].shape == () and float(checked["sr"]) == 16000 and backend.count(checked) == 2
    assert backend.check_feeds({**checked, "sr": np.array([8000.0])})["sr"].shape == ()  # [1] for a scalar
    with pytest.raises(DataError, match="state 3 on axis 1"):
        backend.check_feeds({"input": np.zeros((2, 3)), "state": np.zeros((2, 3, 4))})
    assert not backend.plain and backend.batched


def test_sequences_carry_each_step_state():
    backend = _Recurrent()
    feeds = _feeds(5)
    steps = [{k: (v[i:i + 1] if k == "input" else v[:, i:i + 1] if k == "state" else v) for k, v in feeds.items()}
             for i in range(5)]
    outputs = layout.run_sequence(backend.run, steps, backend.outputs, {"stateN": "state"})
    state = feeds["state"][:, :1]
    for index in range(5):
        state = state + feeds["input"][index].sum() * 2.0
        np.testing.assert_allclose(outputs[1][:, index:index + 1], state, rtol=1e-5)
    assert outputs[0].shape == (5, 1)


def test_data_follow_each_input_axis_and_allow_scalars(tmp_path):
    specs = [TensorSpec("input", "float32", (None, 3)), TensorSpec("state", "float32", (2, None, 4), batch_axis=1),
             TensorSpec("sr", "int64", ())]
    np.savez(tmp_path / "d.npz", input=np.zeros((6, 3)), state=np.zeros((2, 6, 4)), sr=np.array(16000))
    data = load_dataset(str(tmp_path / "d.npz"), specs)
    assert len(data) == 6 and data.take(2).inputs["state"].shape == (2, 2, 4) and data.slice(1, 2)["sr"].shape == ()
    np.savez(tmp_path / "bad.npz", input=np.zeros((6, 3)), state=np.zeros((6, 2, 4)), sr=np.array(16000))
    with pytest.raises(DataError, match="--batch-axis state=AXIS"):
        load_dataset(str(tmp_path / "bad.npz"), specs)
    np.savez(tmp_path / "nosr.npz", input=np.zeros((6, 3)), state=np.zeros((2, 6, 4)))
    with pytest.raises(DataError, match="--constant sr=VALUE"):
        load_dataset(str(tmp_path / "nosr.npz"), specs)
    assert int(load_dataset(str(tmp_path / "nosr.npz"), specs, constants={"sr": 8000}).inputs["sr"]) == 8000
    random = random_dataset(specs, count=5, constants={"sr": 16000}, shapes={"input": (1, 3)}, zeros=("state",))
    assert random.inputs["state"].shape == (2, 5, 4) and not random.inputs["state"].any()
    assert int(random.inputs["sr"]) == 16000 and len(random) == 5


def test_options_are_parsed_with_clear_errors():
    assert layout.parse_batch_axes(["state=1", "sr=none"]) == {"state": 1, "sr": None}
    assert layout.parse_constants(["sr=16000", "gain=0.5", "v=1,2"]) == {"sr": 16000, "gain": 0.5, "v": [1, 2]}
    assert layout.parse_state(["stateN=state"]) == {"stateN": "state"}
    for parse, value in ((layout.parse_batch_axes, "state"), (layout.parse_batch_axes, "state=x"),
                         (layout.parse_constants, "sr=abc"), (layout.parse_state, "stateN")):
        with pytest.raises(UsageError):
            parse([value])


def test_the_manifest_refuses_axes_and_states_that_do_not_fit():
    assert TensorEntry(name="s", dtype="float32", shape=[2, None, 4], batch_axis=1).batch_axis == 1
    with pytest.raises(ValueError):
        TensorEntry(name="s", dtype="float32", shape=[2, None], batch_axis=3)
    spec = TensorSpec("s", "float32", (2, None, 4), batch_axis=1)
    assert TensorSpec.from_dict(spec.to_dict()).sample_axis == 1
    assert "batch_axis" not in TensorSpec("x", "float32", (None, 3)).to_dict()
    manifest = {"schema": "edgepack.bundle/v1", "name": "m", "version": "1.0.0", "profile": "x86-64",
                "runtime": {"name": "onnxruntime"}, "format": "onnx", "precision": "fp32", "model_file": "model/model.onnx",
                "files": {"model/model.onnx": {"size": 1, "sha256": "0" * 64}},
                "inputs": [spec.to_dict()], "outputs": [{"name": "y", "dtype": "float32", "shape": [None]}],
                "batch": {"mode": "dynamic", "state": {"missing": "s"}}}
    with pytest.raises(BundleError, match="batch"):
        check_manifest(manifest)
    manifest["batch"]["state"] = {"y": "s"}
    assert check_manifest(manifest)


def test_fixed_batch_exports_with_named_dimensions_keep_their_batch_on_axis_0(tmp_path):
    """A batch-1 image model with named H and W, and a batch-1 text model whose inputs share ``seq``:
    their samples are on axis 0 (a symbol never on axis 0 is no batch)."""
    image = _graph(tmp_path, {"x": [1, 3, "height", "width"]}, {"y": [1, 10]}, "image.onnx")
    assert layout.detect_input_axes(image) == {"x": 0}
    text = _graph(tmp_path, {"ids": [1, "seq"], "mask": [1, "seq"]}, {"y": [1, "seq", 8]}, "text.onnx")
    assert layout.detect_input_axes(text) == {"ids": 0, "mask": 0}
    unnamed = _graph(tmp_path, {"ids": [1, None], "mask": [1, None]}, {"y": [1, 8]}, "unnamed.onnx")
    assert layout.detect_input_axes(unnamed) == {"ids": 0, "mask": 0}


def test_an_output_of_unknown_rank_keeps_a_model_mergeable():
    backend = _Recurrent()
    backend.inputs = backend.inputs[:1]
    backend.outputs = [TensorSpec("y", "float32", ())]  # ORT reports an unknown shape as []
    assert backend.plain


def test_a_constant_that_does_not_fit_is_a_usage_error():
    specs = [TensorSpec("x", "float32", (None, 3)), TensorSpec("gain", "float32", (2,), batch_axis=None)]
    with pytest.raises(UsageError, match="--constant gain"):
        random_dataset(specs, constants={"gain": [1.0, 2.0, 3.0]})
    assert random_dataset(specs, constants={"gain": 0.5}).inputs["gain"].tolist() == [0.5, 0.5]
