"""Histogram calibration one range of batches at a time gives onnxruntime's own ranges.

``converters.onnx.histogram_calibration`` runs the data twice in small ranges (ranges, then fixed bins)
so memory does not grow with the calibration set; ORT's calibrator, given every batch in one call,
is the reference: each method's thresholds must be the same numbers, and a last batch of another size
(which ORT's one-call collector cannot stack) must work.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.onnx.histogram_calibration import calibrate_histograms


def _model(path) -> None:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)
               for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


class _Reader:
    """A CalibrationDataReader over batches, with the ``len``/``set_range`` of a strided reader."""

    def __init__(self, batches):
        self.batches = batches
        self.set_range(0, len(batches))

    def __len__(self):
        return len(self.batches)

    def set_range(self, start_index, end_index):
        self.next, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self):
        if self.next >= self.end:
            return None
        self.next += 1
        return {"x": self.batches[self.next - 1]}


def _batches(sizes):
    rng = np.random.default_rng(1)
    # the first batch near zero, later ones large: ORT's collector, fed range by range, would size
    # its bins from the first and drop or mis-bin the rest
    return [rng.normal(0, 0.01 if i == 0 else 3.0, (size, 3, 16, 16)).astype(np.float32)
            for i, size in enumerate(sizes)]


@pytest.mark.parametrize("method, options", [("Entropy", {}), ("Percentile", {"percentile": 99.9}),
                                             ("Percentile", {"percentile": 99.9, "symmetric": False}),
                                             ("Distribution", {})])
def test_ranges_one_batch_at_a_time_are_onnxruntimes_ranges_from_all_batches(tmp_path, method, options):
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    model = tmp_path / "m.onnx"
    _model(model)
    batches = _batches([4, 4, 4, 4])
    reference = create_calibrator(model, None, augmented_model_path=str(tmp_path / "aug.onnx"),
                                  calibrate_method=getattr(CalibrationMethod, method), extra_options=options)
    reference.collect_data(_Reader(batches))
    expected = reference.compute_data()
    found = calibrate_histograms(model, _Reader(batches), getattr(CalibrationMethod, method), extra_options=options)
    assert set(found.data) == set(expected.data) and len(found.data) >= 3
    for name, data in expected.data.items():
        if method == "Distribution":
            assert np.array_equal(found.data[name].hist, data.hist), name
            assert np.array_equal(found.data[name].avg, data.avg) and np.array_equal(found.data[name].std, data.std)
        else:
            assert np.array_equal(found.data[name].range_value, data.range_value), (name, found.data[name], data)


def test_a_last_batch_of_another_size_calibrates(tmp_path):
    from onnxruntime.quantization import CalibrationMethod

    model = tmp_path / "m.onnx"
    _model(model)
    found = calibrate_histograms(model, _Reader(_batches([4, 4, 3])), CalibrationMethod.Entropy, held_batches=2)
    low, high = found.data["y"].range_value
    assert low < 0 < high and np.isfinite([low, high]).all()
