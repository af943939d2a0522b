"""A text detector users bring: PP-OCRv4's DBNet-style detector (MobileNetV3-class backbone with
hard-swish and squeeze-excite, an FPN and a transposed-convolution head; input ``x [N, 3, H, W]`` with
dynamic H and W, output a probability map ``[N, 1, H, W]``), as the rapidocr-onnxruntime wheel ships
it, on photos of text bundled with scikit-image.

Converted for x86-64 and rpi4 with separate calibration and validation crops, judged as a map (cosine
and IoU of the thresholded map), installed and served: over OIP (x86-64) and from a batch file (rpi4),
compared with the original model run directly. Static int8 of this model loses the map (IoU ~0.65);
the mixed recipe, ranking layers by the error each causes at the output, ships int8 within the budget.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from ..conftest import run_cli
from ..photos import text_images
from .daemon import Daemon

_SPEC = importlib.util.find_spec("rapidocr_onnxruntime")  # found, not imported (it needs OpenCV)
MODEL = Path(_SPEC.origin).parent / "models" / "ch_PP-OCRv4_det_infer.onnx" if _SPEC and _SPEC.origin else None
pytestmark = pytest.mark.skipif(MODEL is None or not MODEL.is_file(),
                                reason="pip install --no-deps rapidocr-onnxruntime (it ships the detector's ONNX file)")
SIZE = 320  # the model takes any H and W; 320 keeps the suite's time down (the benchmark runs 640)


def original_maps(images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": image[None]})[0] for image in images])


def map_agreement(expected: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Cosine over all pixels and IoU of the maps thresholded at 0.3 (the gate's map measures)."""
    a, b = expected.ravel().astype(np.float64), got.ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return cosine, float(((a > 0.3) & (b > 0.3)).sum() / max(1, ((a > 0.3) | (b > 0.3)).sum()))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detector")
    np.save(folder / "calibration.npy", text_images(8, SIZE, seed=0))
    validation = text_images(8, SIZE, seed=1)
    np.save(folder / "validation.npy", validation)
    done = run_cli("convert", MODEL, "--name", "det", "--profile", "x86-64", "--profile", "rpi4",
                   "--recipe", "onnx-int8-mixed", "--recipe", "onnx-fp32", "--calibration", folder / "calibration.npy",
                   "--validation", folder / "validation.npy", "--out", folder / "out", "--json")
    assert done.returncode == 0, done.stderr
    return folder, validation, {report["profile"]: report for report in json.loads(done.stdout)["profiles"]}


def test_mixed_int8_keeps_the_map_and_ships(converted):
    _, _, reports = converted
    for profile, report in reports.items():
        assert report["bundle"], report
        rows = {row["recipe"]: row for row in report["candidates"]}
        mixed = rows["onnx-int8-mixed"]
        print(profile, mixed["status"], mixed.get("latency_ratio"), mixed["details"]["search"])
        # Judged as a map: the accuracy budgets hold; only a host timing may refuse it.
        accuracy = [reason for reason in mixed["reasons"] if "cosine" in reason or "IoU" in reason]
        assert not accuracy, mixed["reasons"]
        assert mixed["status"] in ("shipped", "rejected"), mixed
        (output,) = mixed["metrics"]["outputs"]
        assert output["map_iou"] >= 0.9 and output["cosine"] >= 0.99 if profile == "x86-64" else output["cosine"] >= 0.98
        floats = mixed["details"]["float_layers"]
        assert mixed["details"]["ranking"] == "output" and len(floats) <= 16, floats
        assert floats[0]["output_sqnr_db"] < 20  # the worst layer alone costs that much at the output


def test_served_over_oip_equals_the_original_map(converted):
    folder, validation, reports = converted
    expected = original_maps(validation[:3])
    shipped = reports["x86-64"]["chosen"]
    with Daemon("--bundle", reports["x86-64"]["bundle"]) as running:
        client = triton.InferenceServerClient(running.address)
        metadata = client.get_model_metadata("det")
        assert metadata["inputs"][0]["shape"] == [-1, 3, -1, -1]
        served = []
        for index, image in enumerate(validation[:3]):
            tensor = triton.InferInput("x", [1, 3, SIZE, SIZE], "FP32")
            tensor.set_data_from_numpy(image[None], binary_data=True)
            served.append(client.infer("det", [tensor]).as_numpy("sigmoid_0.tmp_0"))
        assert running.stop() == 0
    served = np.concatenate(served)
    assert served.shape == expected.shape == (3, 1, SIZE, SIZE)
    cosine, iou = map_agreement(expected, served)
    print(f"served {shipped} vs the original: cosine {cosine:.4f}, map IoU {iou:.4f}")
    if shipped == "onnx-fp32":
        np.testing.assert_allclose(served, expected, atol=1e-4)
    else:
        assert cosine >= 0.99 and iou >= 0.9


def test_rpi4_bundle_predicts_the_map_offline(converted, tmp_path):
    """``edgepack-agent predict`` on an Arm core or an x86 one with VNNI. Elsewhere int8 kernels sum
    products in int16 pairs that saturate with the rpi4 bundle's 8-bit weights, so the agent's load-time
    smoke test refuses the bundle (rightly: it would not compute what was judged); the bundle's graph is
    then checked on the operators' reference arithmetic, as the gate judged it
    (``../shared/tools/aarch64-agent-check.sh`` runs the agent itself on arm64 under qemu)."""
    import onnxruntime as ort

    from agent.runtime.cpu import host_arch, host_int8_dot_product
    from edgepack.bundle import open_bundle

    folder, validation, reports = converted
    bundle = reports["rpi4"]["bundle"]
    expected = original_maps(validation)
    if reports["rpi4"]["chosen"].startswith("onnx-int8") and host_arch() == "x86_64" and not host_int8_dot_product():
        with open_bundle(bundle) as opened:
            files = opened.extract_to(tmp_path / "bundle")
        model = next(path for path in files.values() if str(path).endswith(".onnx"))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        got = np.concatenate([session.run(None, {"x": image[None]})[0] for image in validation])
    else:
        np.save(tmp_path / "in.npy", validation)
        done = run_cli("predict", "--bundle", bundle, "--input", tmp_path / "in.npy", "--output", tmp_path / "out.npz",
                       program="edgepack-agent")
        assert done.returncode == 0, done.stderr
        with np.load(tmp_path / "out.npz") as outputs:
            got = outputs["sigmoid_0.tmp_0"]
    cosine, iou = map_agreement(expected, got)
    assert cosine >= 0.98 and iou >= 0.9, (cosine, iou)
