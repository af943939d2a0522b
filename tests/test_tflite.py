"""The TFLite path: litert-torch conversion, full-integer int8, LiteRT in the agent, clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepack.bundle import open_bundle

from .conftest import invoke_each, run_cli
from .models import digits_features

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")


@pytest.fixture(scope="module")
def tflite_bundles(digits, tmp_path_factory):
    """The digits CNN as TFLite fp32 and full-int8 bundles for rpi4 (reports kept)."""
    from converters.pipeline import ConvertOptions, convert

    out = tmp_path_factory.mktemp("tflite")
    common = dict(model=str(digits / "digits_cnn.pt2"), profiles=["rpi4"], calibration=str(digits / "calibration.npz"),
                  validation=str(digits / "validation.npz"), name="digits")
    (fp32,) = convert(ConvertOptions(out=out / "fp32", recipes=["tflite-fp32"], **common))
    (int8,) = convert(ConvertOptions(out=out / "int8", **common))  # the profile's own order
    return fp32, int8


def _interpreter(bundle_path, folder):
    from ai_edge_litert.interpreter import Interpreter

    with open_bundle(bundle_path) as bundle:
        (folder / "m.tflite").write_bytes(bundle.read_file(bundle.manifest["model_file"]))
        manifest = bundle.manifest
    interpreter = Interpreter(model_path=str(folder / "m.tflite"))
    interpreter.allocate_tensors()
    return interpreter, manifest


def test_tflite_fp32_matches_pytorch(tflite_bundles, digits_module, validation_arrays, tmp_path):
    import torch

    fp32, _ = tflite_bundles
    assert fp32.chosen == "tflite-fp32"
    images, _ = validation_arrays
    np.save(tmp_path / "in.npy", images[:32])
    result = run_cli("predict", "--bundle", fp32.bundle, "--input", tmp_path / "in.npy", "--output", tmp_path / "out.npy",
                     program="edgepack-agent")
    assert result.returncode == 0, result.stderr
    got = np.load(tmp_path / "out.npy")
    expected = digits_module(torch.from_numpy(images[:32])).detach().numpy()
    assert np.max(np.abs(got - expected)) < 1e-4


def test_rpi4_ships_full_int8_tflite_first(tflite_bundles):
    _, int8 = tflite_bundles
    assert int8.chosen == "tflite-int8"
    rows = {row.recipe: row for row in int8.candidates}
    assert rows["tflite-int8"].metrics["agreement"] >= 0.99
    with open_bundle(int8.bundle) as bundle:
        manifest = bundle.manifest
    assert manifest["format"] == "tflite" and manifest["runtime"]["name"] == "litert"
    assert manifest["model_file"] == "model/model.tflite"
    (spec,) = manifest["inputs"]
    assert spec["dtype"] == "int8" and spec["quantization"]["scale"] > 0  # integer I/O, recorded
    assert "CONV_2D" in manifest["coverage"]["ops"]


def test_integer_io_round_trips_through_the_agent(tflite_bundles, validation_arrays, tmp_path):
    """Agent (LiteRT backend and `edgepack-agent predict`) == the interpreter called directly."""
    from agent.runtime import run_in_batches
    from agent.runtime.litert_backend import LiteRTBackend

    _, int8 = tflite_bundles
    images, _ = validation_arrays
    interpreter, manifest = _interpreter(int8.bundle, tmp_path)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    quantized = np.clip(np.round(images[:20] / in_scale) + in_zero, -128, 127).astype(np.int8)
    direct = (invoke_each(interpreter, quantized).astype(np.float32) - out_zero) * out_scale

    np.save(tmp_path / "in.npy", images[:20])
    result = run_cli("predict", "--bundle", int8.bundle, "--input", tmp_path / "in.npy", "--output", tmp_path / "out.npy",
                     program="edgepack-agent")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), direct, rtol=0, atol=1e-6)

    backend = LiteRTBackend(tmp_path / "m.tflite", threads=2, integer_io=True)
    assert backend.inputs[0].dtype == "int8"
    assert backend.batch_size == 1  # exported at batch 1: the one splitter runs N samples one by one
    raw = run_in_batches(backend, {backend.inputs[0].name: np.clip(np.round(images[:3] / in_scale) + in_zero, -128, 127).astype(np.int8)})[0]
    assert raw.dtype == np.int8 and raw.shape == (3, 10)
    np.testing.assert_allclose((raw.astype(np.float32) - out_zero) * out_scale, direct[:3], atol=1e-6)


def test_full_int8_is_about_4x_smaller(tmp_path):
    features, labels = digits_features(300)
    np.savez(tmp_path / "data.npz", input=features, labels=labels)
    result = run_cli("convert", "tests.models:wide_mlp", "--input-shape", "input=1,64", "--profile", "rpi4",
                     "--recipe", "tflite-int8", "--recipe", "tflite-fp32", "--try-all", "--calibration",
                     tmp_path / "data.npz", "--out", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    rows = {c["recipe"]: c for c in json.loads(result.stdout)["profiles"][0]["candidates"]}
    assert rows["tflite-int8"]["status"] == "shipped"
    assert rows["tflite-int8"]["size_bytes"] < 0.3 * rows["tflite-fp32"]["size_bytes"]
    assert rows["tflite-int8"]["metrics"]["agreement"] >= 0.98


def test_unlowerable_op_is_named_and_onnx_still_ships(tmp_path):
    features, _ = digits_features(64)
    np.save(tmp_path / "data.npy", features)
    result = run_cli("convert", "tests.models:determinant", "--input-shape", "input=1,64", "--profile", "rpi4",
                     "--recipe", "tflite-fp32", "--recipe", "onnx-fp32", "--calibration", tmp_path / "data.npy",
                     "--out", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    rows = {c["recipe"]: c for c in json.loads(result.stdout)["profiles"][0]["candidates"]}
    assert rows["tflite-fp32"]["status"] == "failed"
    assert "cannot lower op aten._linalg_det" in rows["tflite-fp32"]["reasons"][0]
    assert rows["onnx-fp32"]["status"] == "shipped"


def test_onnx_source_says_why_there_is_no_tflite(converted, tmp_path):
    with open_bundle(converted["x86-64"].bundle) as bundle:
        (tmp_path / "model.onnx").write_bytes(bundle.read_file("model/model.onnx"))
    features = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "data.npy", features)
    result = run_cli("convert", tmp_path / "model.onnx", "--profile", "rpi4", "--recipe", "tflite-int8", "--recipe",
                     "onnx-fp32", "--calibration", tmp_path / "data.npy", "--out", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    rows = {c["recipe"]: c for c in json.loads(result.stdout)["profiles"][0]["candidates"]}
    assert rows["tflite-int8"]["status"] == "failed"
    assert "given as ONNX" in rows["tflite-int8"]["reasons"][0]


def test_litert_bundle_served_over_http(tflite_bundles, validation_arrays):
    import tritonclient.http as triton

    from .integration.daemon import Daemon

    _, int8 = tflite_bundles
    images, _ = validation_arrays
    with Daemon("--bundle", int8.bundle) as running:
        client = triton.InferenceServerClient(running.address)
        assert client.get_model_metadata("digits")["platform"] == "tensorflow_lite"
        tensor = triton.InferInput("input", [8, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(images[:8])
        scores = client.infer("digits", [tensor]).as_numpy("linear")
        assert running.stop() == 0
    # stderr stays JSON lines: LiteRT's one-time XNNPACK banner is kept off it.
    assert not [entry for entry in running.logs if entry.get("raw")], running.lines
    assert scores.shape == (8, 10) and scores.dtype == np.float32


def test_callers_can_ask_for_raw_int8(tflite_bundles, validation_arrays, tmp_path):
    """integer_io: `predict --integer-io` and the daemon's per-model option pass int8 through untouched."""
    import tritonclient.http as triton

    from .integration.daemon import Daemon

    fp32, int8 = tflite_bundles
    images, _ = validation_arrays
    interpreter, _ = _interpreter(int8.bundle, tmp_path)
    scale, zero = interpreter.get_input_details()[0]["quantization"]
    quantized = np.clip(np.round(images[:6] / scale) + zero, -128, 127).astype(np.int8)
    direct = invoke_each(interpreter, quantized)

    np.save(tmp_path / "q.npy", quantized)
    result = run_cli("predict", "--bundle", int8.bundle, "--integer-io", "--input", tmp_path / "q.npy", "--output",
                     tmp_path / "raw.npy", program="edgepack-agent")
    assert result.returncode == 0, result.stderr
    raw = np.load(tmp_path / "raw.npy")
    assert raw.dtype == np.int8 and np.array_equal(raw, direct)
    result = run_cli("predict", "--bundle", fp32.bundle, "--integer-io", "--input", tmp_path / "q.npy", "--output",
                     tmp_path / "x.npy", program="edgepack-agent")
    assert result.returncode == 2 and "has float inputs and outputs" in result.stderr

    config = tmp_path / "agent.yaml"
    config.write_text("models:\n  - name: digits\n    integer_io: true\n")
    with Daemon("--config", config, "--bundle", int8.bundle) as running:
        client = triton.InferenceServerClient(running.address)
        metadata = client.get_model_metadata("digits")
        assert metadata["inputs"][0]["datatype"] == "INT8"
        assert metadata["inputs"][0]["parameters"] == {"scale": pytest.approx(scale), "zero_point": zero}
        tensor = triton.InferInput("input", list(quantized.shape), "INT8")
        tensor.set_data_from_numpy(quantized)
        answer = client.infer("digits", [tensor]).as_numpy("linear")
        assert running.stop() == 0
    assert answer.dtype == np.int8 and np.array_equal(answer, direct)


def _with_signatures(path, signatures: dict) -> None:
    """Rewrite the ``shape_signature`` of the named tensors of a .tflite file (-1: any size), as
    TensorFlow's converter writes them for a dynamic dimension (litert-torch cannot export one here)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(path.read_bytes(), 0))
    for tensor in model.subgraphs[0].tensors:
        name = tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name
        if name in signatures:
            tensor.shapeSignature = np.asarray(signatures[name], dtype=np.int32)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def test_a_state_with_its_batch_on_axis_1_and_a_scalar_resize_the_interpreter(tmp_path):
    """A recurrent model (x [batch, 4], state [2, batch, 4], a scalar gain) whose batch is free: the
    interpreter is resized to each run's shapes on the axes the bundle's layout names, not axis 0."""
    import litert_torch
    import torch
    from ai_edge_litert.interpreter import Interpreter

    from agent.runtime.base import run_in_batches
    from agent.runtime.litert_backend import LiteRTBackend

    class Step(torch.nn.Module):
        def forward(self, x, state, gain):
            new_state = state * 0.5 + x * gain  # broadcasting: no reshape with a constant shape
            return new_state.sum(0), new_state

    examples = (torch.randn(2, 4), torch.randn(2, 2, 4), torch.tensor(1.5))
    path = tmp_path / "step.tflite"
    litert_torch.convert(Step().eval(), examples).export(str(path))
    interpreter = Interpreter(model_path=str(path))
    names = {d["name"]: list(d["shape"]) for d in interpreter.get_input_details() + interpreter.get_output_details()}
    free = {name: [-1 if (len(shape) == 2 and i == 0) or (len(shape) == 3 and i == 1) else d
                   for i, d in enumerate(shape)] for name, shape in names.items() if shape}
    _with_signatures(path, free)

    backend = LiteRTBackend(path, threads=1, input_names=["x", "state", "gain"], output_names=["y", "next_state"])
    assert backend.resizable
    backend.set_layout({"x": 0, "state": 1, "gain": None, "y": 0, "next_state": 1})
    assert backend.batch_dynamic
    rng = np.random.default_rng(0)
    for batch in (3, 1, 5):
        x = rng.standard_normal((batch, 4)).astype(np.float32)
        state = rng.standard_normal((2, batch, 4)).astype(np.float32)
        y, next_state = run_in_batches(backend, backend.check_feeds({"x": x, "state": state, "gain": np.float32(1.5)}))
        expected = state * 0.5 + x * 1.5
        np.testing.assert_allclose(next_state, expected, rtol=1e-6)
        np.testing.assert_allclose(y, expected.sum(0), rtol=1e-6)
