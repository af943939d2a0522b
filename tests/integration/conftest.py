"""Fixtures shared by the integration tests."""

from __future__ import annotations

import numpy as np
import pytest

from edgepack.bundle.signing import generate_keys

from ..conftest import run_cli
from ..models import digits_features


@pytest.fixture(scope="session")
def fleet_bundles(tmp_path_factory):
    """Signed bundles of the small fleet model: good 1.0.0 and 1.1.0, NaN 1.2.0, slow 1.3.0 (x86-64),
    good 1.1.0 for rpi4; the key pair and an untrusted key."""
    from converters.pipeline import ConvertOptions, convert

    folder = tmp_path_factory.mktemp("fleet")
    private, public = generate_keys(folder / "keys")
    other_private, _ = generate_keys(folder / "other")
    rng = np.random.default_rng(0)
    np.save(folder / "calib.npy", rng.uniform(0.1, 1.0, (64, 8)).astype(np.float32))
    made = {}
    for factory, version, profile in [("fleet_good", "1.0.0", "x86-64"), ("fleet_good", "1.1.0", "x86-64"),
                                      ("fleet_nan", "1.2.0", "x86-64"), ("fleet_slow", "1.3.0", "x86-64"),
                                      ("fleet_good", "1.1.0", "rpi4")]:
        out = folder / f"{factory}-{version}-{profile}"
        (result,) = convert(ConvertOptions(model=f"tests.models:{factory}", profiles=[profile], out=out,
                                           calibration=str(folder / "calib.npy"), input_shapes={"input": [1, 8]},
                                           name="fleet", version=version, recipes=["onnx-fp32"], signing_key=private))
        assert result.bundle, result
        made[(version, profile)] = result.bundle
    return {"bundles": made, "private": private, "public": public, "other": other_private, "folder": folder}


@pytest.fixture(scope="session")
def wide_bundles(tmp_path_factory):
    """Two signed x86-64 fp32 versions of a 1.2 MB model: ten chunks each."""
    from converters.pipeline import ConvertOptions, convert

    folder = tmp_path_factory.mktemp("wide")
    private, public = generate_keys(folder / "keys")
    features, _ = digits_features(64)
    np.save(folder / "calib.npy", features)
    made = {}
    for version in ("1.0.0", "1.1.0"):
        (result,) = convert(ConvertOptions(model="tests.models:wide_mlp", profiles=["x86-64"], out=folder / version,
                                           calibration=str(folder / "calib.npy"), input_shapes={"input": [1, 64]},
                                           name="wide", version=version, recipes=["onnx-fp32"], signing_key=private))
        made[version] = result.bundle
    return {"bundles": made, "private": private, "public": public, "folder": folder}


@pytest.fixture(scope="session")
def simple_bundle(tmp_path_factory):
    """An x86-64 bundle shaped like Triton's "simple" model: INPUT0, INPUT1 INT32 [-1, 16] -> OUTPUT0 =
    their sum, OUTPUT1 = their difference (what Triton's example clients check)."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path_factory.mktemp("simple")
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT32, ["batch", 16]) for name in ("INPUT0", "INPUT1")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.INT32, ["batch", 16]) for name in ("OUTPUT0", "OUTPUT1")]
    graph = helper.make_graph([helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
                               helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])], "simple", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "simple.onnx")
    done = run_cli("convert", folder / "simple.onnx", "--profile", "x86-64", "--out", folder / "out", "--name", "simple",
                   "--version", "1.0.0", "--recipe", "onnx-fp32")
    assert done.returncode == 0, done.stderr
    (bundle,) = (folder / "out").glob("*.edgepack")
    return bundle
