"""A .tflite file as MODEL (packaged as it is), and the tflite-fp16 / tflite-int8-mixed recipes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from edgepack.bundle import open_bundle

from .conftest import invoke_each, run_cli
from .models import digits_features

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")


def _to_tflite(module, example: np.ndarray, path):
    import litert_torch
    import torch

    litert_torch.config.show_progress = False
    litert_torch.convert(module, (torch.from_numpy(example),)).export(str(path))
    return path


@pytest.fixture(scope="module")
def digits_tflite(digits, digits_module, tmp_path_factory):
    """The trained digits CNN converted to .tflite outside edgepack, as a user would bring it."""
    example = np.load(digits / "calibration.npz")["input"][:1]
    return _to_tflite(digits_module, example, tmp_path_factory.mktemp("tflite-file") / "digits.tflite")


def _convert(*args):
    result = run_cli("convert", *args, "--json")
    return result, (json.loads(result.stdout)["profiles"] if result.stdout.strip() else None)


def test_tflite_file_is_packaged_as_given(digits, digits_tflite, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    result, (report,) = _convert(digits_tflite, "--profile", "rpi4", "--validation", digits / "validation.npz",
                                 "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    (row,) = report["candidates"]
    assert row["recipe"] == "tflite-as-given" and row["status"] == "shipped"
    # Said plainly: nothing to compare with, so the gate did not run; accuracy on the labels is still shown.
    assert "accuracy gate skipped: nothing to compare with" in row["reasons"][0]
    assert row["metrics"]["accuracy"] > 0.9
    with open_bundle(report["bundle"]) as bundle:
        packaged = bundle.read_file(bundle.manifest["model_file"])
        manifest = bundle.manifest
    assert hashlib.sha256(packaged).digest() == hashlib.sha256(digits_tflite.read_bytes()).digest()
    assert manifest["runtime"]["name"] == "litert" and manifest["precision"] == "fp32"
    assert "CONV_2D" in manifest["coverage"]["ops"] and manifest["coverage"]["min_runtime_version"] == "2.0.0"

    images = np.load(digits / "validation.npz")["input"][:16]
    np.save(tmp_path / "in.npy", images)
    predicted = run_cli("predict", "--bundle", report["bundle"], "--input", tmp_path / "in.npy", "--output",
                        tmp_path / "out.npy", program="edgepack-agent")
    assert predicted.returncode == 0, predicted.stderr
    interpreter = Interpreter(model_path=str(digits_tflite))
    interpreter.allocate_tensors()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), invoke_each(interpreter, images), atol=1e-6)


def test_tflite_file_is_gated_against_its_reference(digits, digits_tflite, tmp_path):
    import digits_cnn

    result, (report,) = _convert(digits_tflite, "--reference", digits / "digits_cnn.pt2", "--profile", "rpi5",
                                 "--validation", digits / "validation.npz", "--out", tmp_path / "good")
    assert result.returncode == 0, result.stderr
    (row,) = report["candidates"]
    assert row["metrics"]["agreement"] == 1.0 and row["metrics"]["outputs"][0]["max_abs_error"] < 1e-4
    assert "met the budget against digits_cnn.pt2" in row["reasons"][0]
    with open_bundle(report["bundle"]) as bundle:
        assert [spec["name"] for spec in bundle.manifest["inputs"]] == ["input"]  # the original's names

    # A .tflite that is not what the reference computes (an untrained copy) is refused, with why.
    example = np.load(digits / "calibration.npz")["input"][:1]
    wrong = _to_tflite(digits_cnn.build_model().eval(), example, tmp_path / "untrained.tflite")
    result, (report,) = _convert(wrong, "--reference", digits / "digits_cnn.pt2", "--profile", "rpi4",
                                 "--validation", digits / "validation.npz", "--out", tmp_path / "bad")
    assert result.returncode == 1
    assert report["bundle"] is None and "does not meet the budget against digits_cnn.pt2" in report["error"]
    assert not list((tmp_path / "bad").glob("*"))


def test_tflite_file_refusals(digits, digits_tflite, tmp_path):
    from edgepack.profiles import profiles_dir

    # No LiteRT on the profile.
    result, (report,) = _convert(digits_tflite, "--profile", "x86-64", "--out", tmp_path / "out")
    assert result.returncode == 1 and "x86-64 has no LiteRT runtime" in report["error"]
    # An op the device's LiteRT build lacks (a profile saying so), named.
    folder = tmp_path / "profiles"
    shutil.copytree(profiles_dir(), folder)
    text = (folder / "rpi4.yaml").read_text().replace("    delegates: [xnnpack]",
                                                       "    delegates: [xnnpack]\n    unsupported_ops: [CONV_2D]")
    (folder / "rpi4.yaml").write_text(text)
    result = run_cli("convert", digits_tflite, "--profile", "rpi4", "--out", tmp_path / "out", "--json",
                     env={**os.environ, "EDGEPACK_PROFILES_DIR": str(folder)})
    assert result.returncode == 1
    assert "CONV_2D is not supported by LiteRT 1.2 on rpi4" in json.loads(result.stdout)["profiles"][0]["error"]
    # A device on the old tflite-runtime package older than the file's min_runtime_version.
    text = (folder / "rpi4.yaml").read_text().replace("    unsupported_ops: [CONV_2D]\n", "").replace(
        '    min_version: "1.2"', '    min_version: "1.14"\n    package: tflite-runtime')
    (folder / "rpi4.yaml").write_text(text)
    result = run_cli("convert", digits_tflite, "--profile", "rpi4", "--out", tmp_path / "out", "--json",
                     env={**os.environ, "EDGEPACK_PROFILES_DIR": str(folder)})
    assert result.returncode == 1, result.stderr
    error = json.loads(result.stdout)["profiles"][0]["error"]
    assert "needs TensorFlow Lite >= 2.0.0" in error and "tflite-runtime 1.14 on rpi4 is older" in error
    (folder / "rpi4.yaml").write_text(text.replace('"1.14"', '"2.5"'))
    result = run_cli("convert", digits_tflite, "--profile", "rpi4", "--out", tmp_path / "old-ok",
                     env={**os.environ, "EDGEPACK_PROFILES_DIR": str(folder)})
    assert result.returncode == 0, result.stderr
    # Usage errors: one line, exit 2.
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a flatbuffer" * 8)
    for args, message in [
        ((garbage, "--profile", "rpi4"), "cannot be loaded as a TFLite model"),
        ((digits_tflite, "--profile", "rpi4", "--recipe", "tflite-int8"), "packaged as it is; drop --recipe"),
        ((digits / "digits_cnn.pt2", "--profile", "rpi4", "--reference", digits_tflite), "--reference is for a .tflite"),
    ]:
        result = run_cli("convert", *args, "--out", tmp_path / "out")
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list((tmp_path / "out").glob("*.edgepack"))


def test_tflite_fp16_halves_the_weights(digits, digits_module, tmp_path):
    result, (report,) = _convert(digits / "digits_cnn.pt2", "--profile", "rpi5", "--recipe", "tflite-fp16",
                                 "--recipe", "tflite-fp32", "--try-all", "--validation", digits / "validation.npz",
                                 "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    rows = {c["recipe"]: c for c in report["candidates"]}
    assert rows["tflite-fp16"]["status"] == "shipped"
    assert rows["tflite-fp16"]["size_bytes"] < 0.6 * rows["tflite-fp32"]["size_bytes"]
    assert rows["tflite-fp16"]["metrics"]["agreement"] >= 0.99
    with open_bundle(report["bundle"]) as bundle:
        assert bundle.manifest["precision"] == "fp16" and "DEQUANTIZE" in bundle.manifest["coverage"]["ops"]


def test_tflite_mixed_keeps_the_damaging_layers_float(tmp_path):
    features, _ = digits_features(300)
    np.save(tmp_path / "data.npy", features)
    result, (report,) = _convert("tests.models:huge_range_deep", "--input-shape", "input=1,64", "--profile", "rpi4",
                                 "--recipe", "tflite-int8", "--recipe", "tflite-int8-mixed", "--calibration",
                                 tmp_path / "data.npy", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    rows = {c["recipe"]: c for c in report["candidates"]}
    assert rows["tflite-int8"]["status"] == "rejected"
    mixed = rows["tflite-int8-mixed"]
    assert mixed["status"] == "shipped" and mixed["metrics"]["agreement"] >= 0.98
    # Found by measurement: the huge-range layer's output is the noisiest point.
    assert mixed["details"]["float_layers"][0]["node"] == "tail.first"
    with open_bundle(report["bundle"]) as bundle:
        manifest = bundle.manifest
        (tmp_path / "m.tflite").write_bytes(bundle.read_file(manifest["model_file"]))
    assert manifest["inputs"][0]["dtype"] == "int8"  # still integer I/O at the front
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(tmp_path / "m.tflite")).get_tensor_details()
    weights = {d["name"]: np.dtype(d["dtype"]).name for d in details if len(d["shape"]) == 2 and d["shape"][1] in (32, 64)}
    assert "int8" in weights.values() and "float32" in weights.values(), weights  # int8 first layer, float tail


_FALLBACK_PROBE = r"""
import sys
import ai_edge_litert.interpreter as real

# Only the old package name is importable, as on a device with tflite-runtime installed.
sys.modules["tflite_runtime"] = type(sys)("tflite_runtime")
sys.modules["tflite_runtime.interpreter"] = real
sys.modules["ai_edge_litert"] = None
sys.modules["ai_edge_litert.interpreter"] = None
from agent.runtime import run_in_batches
from agent.runtime.litert_backend import LiteRTBackend
import numpy as np
backend = LiteRTBackend(sys.argv[1], threads=1)
print(run_in_batches(backend, {backend.inputs[0].name: np.zeros((2, 1, 8, 8), np.float32)})[0].shape)
sys.modules["tflite_runtime.interpreter"] = None
try:
    LiteRTBackend(sys.argv[1])
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_litert_backend_falls_back_to_tflite_runtime(digits_tflite):
    import subprocess
    import sys

    from .conftest import ROOT

    result = subprocess.run([sys.executable, "-c", _FALLBACK_PROBE, str(digits_tflite)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "(2, 10)"
    assert lines[1].startswith("RuntimeBackendError") and "pip install 'edgepack[tflite]'" in lines[1]


@pytest.mark.parametrize("instances", [1, 3])
def test_litert_backend_is_safe_under_concurrent_callers(digits, digits_tflite, instances):
    """Many threads at once: every caller gets its own rows back, whatever interpreter ran them."""
    from concurrent.futures import ThreadPoolExecutor

    from agent.runtime import run_in_batches
    from agent.runtime.litert_backend import LiteRTBackend

    images = np.load(digits / "validation.npz")["input"][:48]
    backend = LiteRTBackend(digits_tflite, threads=1, instances=instances)
    name = backend.inputs[0].name
    expected = [backend.run({name: images[i:i + 1]})[0] for i in range(len(images))]

    def call(index: int) -> bool:
        count = 1 + index % 3  # batch-1 model: the one splitter runs the rows one by one
        rows = images[index:index + count]
        got = run_in_batches(backend, {name: rows})[0]
        return np.array_equal(got, np.concatenate(expected[index:index + len(rows)]))

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(call, list(range(len(images))) * 4))
    backend.close()
    from edgepack.errors import RuntimeBackendError

    with pytest.raises(RuntimeBackendError, match="closed"):
        backend.run({name: images[:1]})
