"""Models exported the usual way, at a fixed batch of 1, through every source kind: converted, then
installed, scored in batch, served over HTTP and smoke-tested by the real agent.

Networks: ``depthwise_cnn`` (MobileNet-style, ``flatten(1)``), whose batch the converter can make
dynamic; ``baked_batch_cnn`` (a ViT-style class token expanded to the traced batch), whose batch stays
fixed at 1 once torch.export bakes it, so the agent has to split every request; ``batch_one_vit``,
written for batch 1 only.
"""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from edgepack.bundle import open_bundle

from ..conftest import run_cli
from ..models import baked_batch_cnn, batch_one_vit, depthwise_cnn
from .daemon import Daemon

FACTORIES = {"depthwise": depthwise_cnn, "baked": baked_batch_cnn, "batch-one": batch_one_vit}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("fixed-batch")
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    np.savez(folder / "calibration.npz", x=images[:64])
    np.save(folder / "inputs.npy", images[100:137])  # 37 samples: no multiple of any batch
    return folder, images[100:137]


def _export(kind: str, network: str, folder) -> tuple[list[str], object]:
    """Save ``network`` at batch 1 as ``kind``; the MODEL argument list for convert and the module."""
    module = FACTORIES[network]()
    example = torch.randn(1, 1, 8, 8)
    if kind == "pt2":
        path = folder / f"{network}.pt2"
        torch.export.save(torch.export.export(module, (example,)), str(path))
        return [path], module
    if kind == "torchscript":
        path = folder / f"{network}.pt"
        torch.jit.save(torch.jit.trace(module, example), str(path))
        return [path, "--input-shape", "x=1,1,8,8"], module
    if kind == "onnx":
        path = folder / f"{network}.onnx"
        # The legacy exporter with no dynamic_axes: every dimension declared fixed, batch 1 included.
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["x"], opset_version=17)
        return [path], module
    return [f"tests.models:{FACTORIES[network].__name__}", "--input-shape", "x=1,1,8,8"], module


def _per_sample(module, images) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(image[None])).numpy() for image in images])


# A trace records x.shape[0] as an op, so the traced "baked" network is dynamic; "batch-one" is not.
CASES = [("pt2", "baked", "fixed"), ("pt2", "depthwise", "dynamic"), ("torchscript", "baked", "dynamic"),
         ("torchscript", "batch-one", "fixed"),
         ("onnx", "baked", "fixed"), ("onnx", "depthwise", "dynamic"), ("factory", "baked", "dynamic"),
         ("factory", "batch-one", "fixed")]


@pytest.mark.parametrize("kind,network,mode", CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_batch1_export_converts_installs_and_predicts(data, tmp_path, kind, network, mode):
    folder, images = data
    model, module = _export(kind, network, tmp_path)
    converted = run_cli("convert", *model, "--profile", "x86-64", "--recipe", "onnx-fp32", "--calibration",
                        folder / "calibration.npz", "--name", "net", "--out", tmp_path / "out", "--json")
    assert converted.returncode == 0, converted.stderr
    (report,) = json.loads(converted.stdout)["profiles"]
    bundle = tmp_path / "out" / "net-1.0.0-x86-64.edgepack"
    with open_bundle(bundle) as opened:
        batch = opened.manifest["batch"]
        declared = opened.manifest["inputs"][0]["shape"][0]
    assert batch["mode"] == mode and batch["invariant"] is True
    assert (declared is None) == (mode == "dynamic") and (batch["size"] == (1 if mode == "fixed" else None))
    if mode == "fixed":
        assert any("batch fixed at 1" in note for note in report["notes"]), report["notes"]
    # The smoke test runs the bundle's 4 samples, on install and on every load.
    store = tmp_path / "store"
    installed = run_cli("install", bundle, "--store", store, "--profile", "x86-64", program="edgepack-agent")
    assert installed.returncode == 0, installed.stderr
    predicted = run_cli("predict", "--input", folder / "inputs.npy", "--output", tmp_path / "out.npy", "--store", store,
                        program="edgepack-agent")
    assert predicted.returncode == 0, predicted.stderr
    assert "scored 37 samples" in predicted.stdout
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), _per_sample(module, images), rtol=1e-4, atol=1e-4)


def test_fixed_batch_bundle_served_over_http_under_concurrency(data, tmp_path):
    """tritonclient, 8 callers at once on a fixed-batch-1 bundle: each answer equals the lone answer."""
    folder, images = data
    model, module = _export("pt2", "baked", tmp_path)
    converted = run_cli("convert", *model, "--profile", "x86-64", "--recipe", "onnx-fp32", "--calibration",
                        folder / "calibration.npz", "--name", "net", "--out", tmp_path / "out")
    assert converted.returncode == 0, converted.stderr
    expected = _per_sample(module, images)
    with Daemon("--bundle", tmp_path / "out" / "net-1.0.0-x86-64.edgepack") as running:
        client = triton.InferenceServerClient(running.address, concurrency=8)
        metadata = client.get_model_metadata("net")
        assert metadata["inputs"][0]["shape"] == [-1, 1, 8, 8]  # any number of samples per request
        config = client.get_model_config("net")
        assert config["max_batch_size"] == 0 and config["parameters"]["model_batch"]["string_value"] == "1"

        def ask(rows: slice):
            tensor = triton.InferInput("x", [len(images[rows]), 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(images[rows])
            return client.async_infer("net", [tensor])  # tritonclient's own concurrency (gevent)

        requests = [slice(i, i + 1) for i in range(len(images))] * 3 + [slice(0, 37), slice(3, 20)]
        pending = [ask(rows) for rows in requests]
        for rows, handle in zip(requests, pending):
            got = handle.get_result().as_numpy(metadata["outputs"][0]["name"])
            np.testing.assert_allclose(got, expected[rows], rtol=1e-5, atol=1e-5)
        assert running.stop() == 0


def test_batch_dependent_recipe_is_never_merged(data, tmp_path):
    """onnx-int8-dynamic computes one activation scale per batch: the gate records it as not batch
    invariant, and the daemon answers a sample the same alone and under concurrent load."""
    folder, images = data
    model, _ = _export("pt2", "depthwise", tmp_path)
    # rpi4 does not enforce host timing, so the int8 candidate ships even where it is not faster here.
    converted = run_cli("convert", *model, "--profile", "rpi4", "--recipe", "onnx-int8-dynamic", "--recipe",
                        "onnx-fp32", "--try-all", "--calibration", folder / "calibration.npz", "--name", "net",
                        "--out", tmp_path / "out", "--json", "--min-agreement", "0.5")
    assert converted.returncode == 0, converted.stderr
    (report,) = json.loads(converted.stdout)["profiles"]
    rows = {row["recipe"]: row for row in report["candidates"]}
    assert rows["onnx-int8-dynamic"]["metrics"]["batch_invariant"] is False
    assert rows["onnx-int8-dynamic"]["metrics"]["batch_deviation"] > 1e-4
    assert rows["onnx-fp32"]["metrics"]["batch_invariant"] is True
    bundle = tmp_path / "out" / "net-1.0.0-rpi4.edgepack"
    with open_bundle(bundle) as opened:
        assert opened.manifest["recipe"]["name"] == "onnx-int8-dynamic", rows["onnx-int8-dynamic"]["reasons"]
        assert opened.manifest["batch"]["invariant"] is False
    with Daemon("--bundle", bundle) as running:
        client = triton.InferenceServerClient(running.address, concurrency=16)
        config = client.get_model_config("net")
        assert config["max_batch_size"] == 0 and config["parameters"]["batch_invariant"]["string_value"] == "false"
        output = client.get_model_metadata("net")["outputs"][0]["name"]

        def ask(index: int):
            tensor = triton.InferInput("x", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(images[index:index + 1])
            return client.async_infer("net", [tensor])

        alone = [ask(i).get_result().as_numpy(output) for i in range(8)]
        pending = [ask(i) for i in list(range(8)) * 8]  # 16 in flight at once
        for index, handle in zip(list(range(8)) * 8, pending):
            np.testing.assert_array_equal(handle.get_result().as_numpy(output), alone[index])
        # A multi-sample request runs its samples one by one too: the same answers as alone.
        tensor = triton.InferInput("x", [8, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(images[:8])
        np.testing.assert_array_equal(client.infer("net", [tensor]).as_numpy(output), np.concatenate(alone))
        assert running.stop() == 0
    predicted = run_cli("predict", "--bundle", bundle, "--input", folder / "inputs.npy", "--output", tmp_path / "p.npy",
                        program="edgepack-agent")
    assert predicted.returncode == 0, predicted.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy")[:8], np.concatenate(alone))


def test_onnx_declared_at_batch_4_stays_fixed_and_pads(data, tmp_path):
    """An ONNX graph traced at batch 4 with the batch baked in: the original runs in chunks of 4 (the
    last one padded), the bundle records fixed 4, and the agent pads 37 samples into 10 runs."""
    folder, images = data
    module = baked_batch_cnn()
    path = tmp_path / "baked4.onnx"
    torch.onnx.export(module, (torch.randn(4, 1, 8, 8),), str(path), dynamo=False, input_names=["x"], opset_version=17)
    converted = run_cli("convert", path, "--profile", "x86-64", "--recipe", "onnx-fp32", "--calibration",
                        folder / "calibration.npz", "--name", "net", "--out", tmp_path / "out", "--json")
    assert converted.returncode == 0, converted.stderr
    bundle = tmp_path / "out" / "net-1.0.0-x86-64.edgepack"
    with open_bundle(bundle) as opened:
        assert opened.manifest["batch"] == {"mode": "fixed", "size": 4, "invariant": True, "max_relative_deviation": 0.0}
    predicted = run_cli("predict", "--bundle", bundle, "--input", folder / "inputs.npy", "--output", tmp_path / "out.npy",
                        program="edgepack-agent")
    assert predicted.returncode == 0, predicted.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), _per_sample(module, images), rtol=1e-4, atol=1e-4)
