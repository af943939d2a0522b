"""The accuracy gate's metrics: what an output is decides how it is judged; near-ties are not confident
answers; bias correction and the conv + ReLU6 annotation make int8 closer to fp32 (measured, real runtimes)."""

from __future__ import annotations

import numpy as np
import pytest

from converters import gate
from edgepack.profiles import Budgets

from .conftest import run_cli


def _logits(rng, count=400, classes=10):
    return rng.normal(0, 3, size=(count, classes)).astype(np.float32)


def test_output_kinds_are_detected_and_declared():
    rng = np.random.default_rng(0)
    scores = _logits(rng)
    unit = scores / np.linalg.norm(scores, axis=1, keepdims=True)
    assert gate.output_kind(scores) == "classes"
    assert gate.output_kind(np.exp(scores) / np.exp(scores).sum(1, keepdims=True)) == "classes"
    assert gate.output_kind(unit) == "embedding"
    assert gate.output_kind(scores[:, 0]) == "regression"
    assert gate.output_kind(scores[:, :1]) == "regression"
    assert gate.output_kind(np.arange(4)) == "labels"
    assert gate.output_kind(rng.normal(size=(4, 3, 8, 8)).astype(np.float32)) == "other"
    assert gate.output_kind(scores, "embedding") == "embedding"


def test_margin_is_the_same_for_logits_and_probabilities():
    rng = np.random.default_rng(1)
    scores = _logits(rng).astype(np.float64)
    probabilities = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    assert np.allclose(gate.top_margin(scores), gate.top_margin(probabilities), atol=1e-6)


def test_near_ties_flipping_is_not_a_confident_answer_changing():
    rng = np.random.default_rng(2)
    reference = _logits(rng)
    margin = gate.top_margin(reference)
    candidate = reference.copy()
    ties = np.flatnonzero(margin < 0.3)
    assert len(ties) > 20
    # Swap the top-2 scores of every near-tie: overall agreement drops, confident answers stay.
    for row in ties:
        first, second = np.argsort(reference[row])[-2:][::-1]
        candidate[row, first], candidate[row, second] = reference[row, second], reference[row, first]
    budgets = Budgets(min_agreement=0.5, min_confident_agreement=1.0, min_cosine=0.9)
    result = gate.evaluate([reference], [candidate], ["scores"], budgets)
    metrics = result.outputs[0]
    assert metrics.kind == "classes"
    assert metrics.top1_agreement == pytest.approx(1 - len(ties) / len(reference))
    assert metrics.confident_agreement == 1.0 and metrics.confident_samples == int((margin > 1.0).sum())
    assert result.passed, result.failures
    # One confident answer changed: the budget on confident samples fails, and says so.
    confident = int(np.flatnonzero(margin > 3)[0])
    candidate[confident] = -candidate[confident]
    result = gate.evaluate([reference], [candidate], ["scores"], budgets)
    assert any("confident samples" in failure for failure in result.failures), result.failures
    # Without a confident-sample budget the same candidate passes the overall floor.
    assert gate.evaluate([reference], [candidate], ["scores"], Budgets(min_agreement=0.5, min_cosine=0.9)).passed


def test_label_outputs_keep_a_strict_budget_of_their_own():
    labels = np.arange(200) % 7
    changed = labels.copy()
    changed[:10] = (changed[:10] + 1) % 7  # 95% agreement: above the 85% floor of class scores
    result = gate.evaluate([labels], [changed], ["label"], Budgets(min_agreement=0.85))
    assert result.outputs[0].kind == "labels"
    assert any("label: agreement 95.00% < 99.00%" in failure for failure in result.failures), result.failures


def test_scores_with_no_confident_sample_are_all_held_to_the_confident_budget():
    rng = np.random.default_rng(5)
    # Sigmoid scores: in [0, 1], rows not summing to 1, margins far below one logit.
    reference = 1 / (1 + np.exp(-rng.normal(size=(300, 5))))
    candidate = reference.copy()
    ties = np.flatnonzero(gate.top_margin(reference) < 0.05)[:15]
    for row in ties:
        first, second = np.argsort(reference[row])[-2:][::-1]
        candidate[row, first], candidate[row, second] = reference[row, second], reference[row, first]
    budgets = Budgets(min_agreement=0.85, min_confident_agreement=0.995, min_cosine=0.9)
    result = gate.evaluate([reference], [candidate], ["scores"], budgets)
    assert result.outputs[0].confident_samples == 0
    assert any("every one counts as confident" in failure for failure in result.failures), result.failures


def test_near_one_hot_probabilities_are_classes_not_an_embedding():
    rng = np.random.default_rng(6)
    probabilities = np.full((50, 10), 1e-5)
    probabilities[np.arange(50), rng.integers(0, 10, 50)] = 1 - 9e-5
    assert gate.output_kind(probabilities) == "classes"


def test_an_embedding_is_judged_by_cosine_and_neighbours_never_argmax():
    rng = np.random.default_rng(3)
    # Pairs of close sentences: each one's nearest neighbour is clearly its pair.
    centres = rng.normal(size=(60, 32))
    reference = np.repeat(centres, 2, axis=0) + rng.normal(0, 0.05, size=(120, 32))
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    noisy = reference + rng.normal(0, 0.002, size=reference.shape)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    good = gate.compare_output("embedding", reference, noisy)
    assert good.kind == "embedding" and good.top1_agreement is None
    assert good.neighbour_agreement > 0.9 and good.cosine > 0.99
    assert good.confident_samples > 100 and good.confident_agreement == 1.0
    # Shuffled rows: every vector still has unit length, but the neighbours are gone.
    shuffled = reference[rng.permutation(len(reference))]
    result = gate.evaluate([reference], [shuffled], ["embedding"], Budgets())
    assert result.outputs[0].neighbour_agreement < 0.2
    assert any("nearest-neighbour agreement" in failure for failure in result.failures), result.failures


def test_regression_outputs_get_relative_error_not_cosine():
    rng = np.random.default_rng(4)
    reference = rng.uniform(10, 20, size=(200, 1)).astype(np.float32)
    close = gate.evaluate([reference], [reference * 1.005], ["price"], Budgets())
    assert close.passed and close.outputs[0].cosine is None
    assert close.outputs[0].relative_error == pytest.approx(0.005, rel=1e-3)
    far = gate.evaluate([reference], [reference * 1.1], ["price"], Budgets())
    assert any("relative error" in failure for failure in far.failures), far.failures


@pytest.fixture(scope="module")
def depthwise_onnx(tmp_path_factory):
    """A MobileNet-style block stack with folded BatchNorm, exported to ONNX, and real-looking data."""
    import torch

    from benchmarks.mobilenet import mobilenet

    torch.manual_seed(0)
    model = mobilenet(classes=10, width=0.5).eval()
    # Pretrained networks have BatchNorm statistics far from identity: give them some.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 3.0)
            module.weight.data.uniform_(0.05, 4.0)
    folder = tmp_path_factory.mktemp("depthwise")
    data = torch.randn(48, 3, 64, 64) * 0.8 + 0.2
    path = folder / "fp32.onnx"
    torch.onnx.export(model, (data[:1],), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    return path, data.numpy()


def test_bias_correction_removes_the_mean_shift_of_int8_weights(depthwise_onnx, tmp_path):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from converters.onnx.bias_correction import correct_biases

    path, data = depthwise_onnx
    calibration, validation = data[:32], data[32:]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": calibration[i:i + 8]} for i in range(0, 32, 8)])

        def get_next(self):
            return next(self.batches, None)

    quantized = tmp_path / "int8.onnx"
    # One weight scale per tensor: rounding errors as large as a pretrained network's depthwise layers see.
    quantize_static(str(path), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    corrected = tmp_path / "int8-bc.onnx"
    info = correct_biases(path, quantized, corrected, [{"x": calibration[i:i + 8]} for i in range(0, 32, 8)])
    assert info["layers"] > 10 and info["max_shift"] > 0

    def run(model):
        # The graphs' own arithmetic: x86 without VNNI fuses QDQ into kernels whose int16 pair sums
        # saturate, an error of that host that bias correction neither causes nor is meant to remove.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        return session.run(None, {"x": validation})[0]

    reference, plain, fixed = run(path), run(quantized), run(corrected)
    # The systematic part of the error (its mean over samples, per output) shrinks; so does the error.
    assert np.abs((fixed - reference).mean(0)).mean() < 0.5 * np.abs((plain - reference).mean(0)).mean()
    assert np.abs(fixed - reference).mean() < 0.8 * np.abs(plain - reference).mean()


@pytest.mark.parametrize("activation", ["module", "function"])
def test_pt2e_quantizes_relu6_after_the_clamp_not_before(activation):
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e import quantize_pt2e

    from converters.pt2e.quantize import quantizer as _quantizer

    torch.manual_seed(0)
    # nn.ReLU6 exports as hardtanh(0, 6), F.relu6 as relu6: real models use both.
    clamp = torch.nn.ReLU6() if activation == "module" else torch.nn.functional.relu6

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, 16, 3, padding=1) for c in (8, 16, 16, 16))

        def forward(self, x):
            for conv in self.convs:
                x = clamp(conv(x))
            return x

    model = Stack().eval()
    with torch.no_grad():
        for conv in model.convs:
            # Pre-activations far wider than [0, 6], as in a pretrained ReLU6 network.
            conv.weight.mul_(4)
    data = torch.randn(24, 8, 16, 16)
    with torch.no_grad():
        reference = model(data)

    def quantized(quantizer):
        prepared = quantize_pt2e.prepare_pt2e(torch.export.export(model, (data[:1],)).module(), quantizer)
        with torch.no_grad():
            for index in range(16):
                prepared(data[index:index + 1])
            converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
            # The exported program is specialised to batch 1.
            outputs = torch.cat([converted(data[index:index + 1]) for index in range(len(data))])
        return prepared, float((outputs - reference).abs().mean())

    ours, error = quantized(_quantizer(False, True))
    stock = pt2e_quantizer.PT2EQuantizer().set_global(pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    _, stock_error = quantized(stock)
    # No observer between a convolution and its clamp: the clamp's output is what gets int8 levels.
    for node in ours.graph.nodes:
        if node.op == "call_function" and "conv" in str(node.target):
            (user,) = node.users
            assert "hardtanh" in str(user.target) or "relu6" in str(user.target), user
    assert error < 0.7 * stock_error, (error, stock_error)


def test_pt2e_bias_correction_never_touches_the_source_module():
    import torch
    from torchao.quantization.pt2e import quantize_pt2e

    from converters.pt2e.bias_correction import correct_if_better
    from converters.pt2e.quantize import quantizer as _quantizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    data = torch.randn(64, 16) + 0.5
    prepared = quantize_pt2e.prepare_pt2e(torch.export.export(model, (data[:1],)).module(), _quantizer(False, True))
    with torch.no_grad():
        for index in range(32):
            prepared(data[index:index + 1])
    converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    samples = [(data[index:index + 1],) for index in range(32)]
    outcome = correct_if_better(converted, model, samples, samples[:16])
    assert outcome["kept"] and outcome["layers"] == 2 and outcome["error_after"] <= outcome["error_before"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_unknown_output_kind_is_one_clear_line(tmp_path):
    from .test_errors import assert_usage_error

    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    program = torch.export.export(model.eval(), (torch.randn(1, 4),))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32))
    result = run_cli("convert", tmp_path / "m.pt2", "--profile", "x86-64", "--calibration", tmp_path / "x.npy",
                     "--output-kind", "nope=embedding", "--out", tmp_path / "out")
    assert_usage_error(result, "--output-kind names output 'nope'")
    result = run_cli("convert", tmp_path / "m.pt2", "--profile", "x86-64", "--calibration", tmp_path / "x.npy",
                     "--output-kind", "junk", "--out", tmp_path / "out")
    assert result.returncode == 2 and "NAME=VALUE" in result.stderr and "Traceback" not in result.stderr


def test_probability_maps_are_judged_over_all_pixels_with_their_thresholded_iou():
    """A text detector's map: a photo without text gives a map of near-zeros whose per-sample cosine
    is noise, so maps are compared over all pixels at once, plus the IoU of the thresholded maps."""
    from converters.gate import compare_output, evaluate, output_kind

    rng = np.random.default_rng(0)
    maps = np.zeros((4, 1, 32, 32), np.float32)
    maps[:3, :, 8:20, 4:28] = 0.9  # three images with a text line
    maps[3] = rng.uniform(0, 1e-7, (1, 32, 32))  # one without text: near-zeros
    assert output_kind(maps) == "map"
    noisy = maps + rng.normal(0, 1e-8, maps.shape).astype(np.float32)
    metrics = compare_output("map", maps, np.clip(noisy, 0, 1))
    assert metrics.kind == "map" and metrics.cosine > 0.9999 and metrics.map_iou == 1.0
    shifted = np.roll(maps, 6, axis=3)  # the boxes land elsewhere
    budgets = Budgets()
    result = evaluate([maps], [shifted], ["map"], budgets)
    assert any("map IoU" in failure for failure in result.failures), result.failures


def test_bias_correction_takes_scalar_inputs_and_a_ragged_last_batch(tmp_path):
    """A model whose first input is a scalar (a sample rate, a gain) and calibration data whose last
    batch is smaller: the means are taken over the batches shaped like the first, nothing raises."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from converters.onnx.bias_correction import correct_biases

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "gain"], ["scaled"], name="scale"),
         helper.make_node("Conv", ["scaled", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "gain_conv",
        [helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "float.onnx"
    onnx.save(model, str(path))
    data = (rng.standard_normal((20, 3, 8, 8)) + 0.5).astype(np.float32)
    gain = np.asarray(1.5, dtype=np.float32)
    batches = [{"gain": gain, "x": data[i:i + 8]} for i in range(0, 20, 8)]  # 8, 8 and 4 samples

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    quantized = tmp_path / "int8.onnx"
    quantize_static(str(path), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    corrected = tmp_path / "int8-bc.onnx"
    info = correct_biases(path, quantized, corrected, batches)
    assert info["layers"] == 1 and info["max_shift"] > 0
    session = ort.InferenceSession(str(corrected), providers=["CPUExecutionProvider"])
    assert session.run(None, {"gain": gain, "x": data[:2]})[0].shape == (2, 8, 8, 8)
