"""The agent's first slice: install into A/B slots, batch predict, status, rollback, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.store import ModelStore
from edgepack.bundle import BundleWriter, open_bundle
from edgepack.errors import EdgepackError, StoreError

from .conftest import run_cli


@pytest.fixture()
def bundles(converted):
    return converted["x86-64"].bundle, converted["rpi4"].bundle


def test_install_predict_status_rollback(bundles, digits, tmp_path, validation_arrays):
    x86, rpi4 = bundles
    store = tmp_path / "store"
    first = run_cli("install", x86, "--store", store, program="edgepack-agent")
    assert first.returncode == 0, first.stderr
    second = run_cli("install", rpi4, "--store", store, program="edgepack-agent")  # same name: the other slot
    assert second.returncode == 0, second.stderr
    status = json.loads(run_cli("status", "--store", store, "--json", program="edgepack-agent").stdout)
    state = status["models"]["digits"]
    assert state["active"] == "b" and state["previous"] == "a"
    assert state["slots"]["b"]["profile"] == "rpi4"
    assert state["slots"]["a"]["health"] == state["slots"]["b"]["health"] == "ok"
    model_file = next((store / "models/digits/slots/a/files/model").iterdir())
    model_file.write_bytes(model_file.read_bytes()[:-1] + b"x")
    status = json.loads(run_cli("status", "--store", store, "--json", program="edgepack-agent").stdout)
    assert "corrupted" in status["models"]["digits"]["slots"]["a"]["health"]

    images, labels = validation_arrays
    np.save(tmp_path / "in.npy", images)
    result = run_cli("predict", "--input", tmp_path / "in.npy", "--output", tmp_path / "out.npz", "--store", store, program="edgepack-agent")
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as out:
        scores = next(iter(out.values()))
    assert scores.shape == (len(images), 10)
    assert np.mean(scores.argmax(1) == labels) > 0.95

    rolled = run_cli("rollback", "--store", store, program="edgepack-agent")
    assert rolled.returncode == 0, rolled.stderr
    assert ModelStore(store).state("digits")["active"] == "a"
    assert ModelStore(store).slot_health("digits", "a") == "ok"  # the corrupted copy was rebuilt from the bundle


def test_predict_formats_match_direct_session(bundles, tmp_path, validation_arrays):
    import onnxruntime as ort

    x86, _ = bundles
    images, _ = validation_arrays
    with open_bundle(x86) as bundle:
        session = ort.InferenceSession(bundle.read_file("model/model.onnx"), providers=["CPUExecutionProvider"])
    # Each sample alone: what the agent answers for a sample whatever the recipe (a batch-dependent one,
    # such as onnx-int8-dynamic, is run one sample at a time by the agent).
    direct = np.concatenate([session.run(None, {"input": image[None]})[0] for image in images[:5]])
    with open(tmp_path / "in.jsonl", "w") as handle:
        for image in images[:5]:
            handle.write(json.dumps({"input": image.tolist()}) + "\n")
    result = run_cli("predict", "--bundle", x86, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", program="edgepack-agent")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    np.testing.assert_allclose(np.array([next(iter(r.values())) for r in rows]), direct, rtol=1e-5, atol=1e-5)


def test_tampered_bundle_leaves_active_model(bundles, tmp_path):
    x86, rpi4 = bundles
    store = ModelStore(tmp_path / "store")
    store.install(x86)
    before = store.state("digits")
    data = bytearray(rpi4.read_bytes())
    data[len(data) // 3] ^= 0x10
    bad = tmp_path / "bad.edgepack"
    bad.write_bytes(data)
    with pytest.raises(EdgepackError):
        store.install(bad)
    after = store.state("digits")
    assert {k: after[k] for k in ("active", "previous", "slots")} == {k: before[k] for k in ("active", "previous", "slots")}
    assert after["update"]["state"] == "idle" and after["update"]["result"] == "failed"
    assert "CRC" in after["update"]["reason"] or "sha256" in after["update"]["reason"]
    assert not store.slot_dir("digits", "b").exists()  # nothing half-installed
    assert not (store.model_dir("digits") / "staging").exists()


def test_wrong_profile_and_failed_smoke_test(bundles, tmp_path):
    x86, rpi4 = bundles
    store = ModelStore(tmp_path / "store", profile="rpi5")
    with pytest.raises(StoreError, match="built for profile 'rpi4'"):
        store.install(rpi4)
    # A bundle whose expected sample outputs are wrong (a broken model) never becomes active.
    with open_bundle(x86) as bundle:
        files = {name: bundle.read_file(name) for name in bundle.manifest["files"]}
        manifest = {k: v for k, v in bundle.manifest.items() if k not in ("files", "schema")}
        expected = bundle.read_array(manifest["samples"]["outputs"]["linear"] if "linear" in manifest["samples"]["outputs"] else next(iter(manifest["samples"]["outputs"].values())))
    writer = BundleWriter()
    for name, data in files.items():
        writer.add_bytes(name, data)
    output_file = next(iter(manifest["samples"]["outputs"].values()))
    writer.add_array(output_file, expected + 100.0)
    broken = tmp_path / "broken.edgepack"
    writer.write(broken, manifest)
    plain = ModelStore(tmp_path / "store2")
    with pytest.raises(StoreError, match="smoke test failed"):
        plain.install(broken)
    assert plain.model_names() == []


def test_predict_errors_are_one_line(bundles, tmp_path):
    x86, _ = bundles
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    result = run_cli("predict", "--bundle", x86, "--input", tmp_path / "bad.npy", "--output", tmp_path / "o.npy", program="edgepack-agent")
    assert result.returncode == 2 and result.stderr.startswith("error: input 'input' needs rank 4")
    assert not (tmp_path / "o.npy").exists()
    empty = run_cli("predict", "--input", tmp_path / "bad.npy", "--output", tmp_path / "o.npy", "--store", tmp_path / "empty", program="edgepack-agent")
    assert empty.returncode == 2 and "holds no model" in empty.stderr


def test_agent_imports_no_host_libraries(bundles, tmp_path):
    """DESIGN.md section 2: the agent never imports torch, onnx, converters and friends."""
    import subprocess
    import sys

    x86, _ = bundles
    np.save(tmp_path / "in.npy", np.zeros((2, 1, 8, 8), np.float32))
    code = f"""
import sys
sys.argv = ["edgepack-agent", "predict", "--bundle", {str(x86)!r}, "--input", {str(tmp_path / 'in.npy')!r}, "--output", {str(tmp_path / 'o.npy')!r}]
import agent.cli, agent.store, agent.model, agent.runtime.onnx_backend, agent.batch_io, agent.bench
try:
    agent.cli.main()
except SystemExit as exit:
    assert not exit.code, exit.code
banned = ["torch", "onnx", "converters", "litert_torch", "transformers", "tensorflow", "onnxscript", "skl2onnx", "sklearn"]
loaded = [name for name in banned if name in sys.modules]
print("LOADED", loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout
    assert (tmp_path / "o.npy").exists()


def test_samples_are_counted_on_each_outputs_own_axis():
    """A state output first, its samples on axis 1: three samples, not its two layers."""
    from agent.batch_io import sample_count
    from edgepack.tensors import TensorSpec

    outputs = {"stateN": np.zeros((2, 3, 128), np.float32), "output": np.zeros((3, 1), np.float32)}
    specs = [TensorSpec("stateN", "float32", (2, None, 128), batch_axis=1), TensorSpec("output", "float32", (None, 1))]
    assert sample_count(outputs, specs) == 3
    assert sample_count({"sr": np.array(16000)}, [TensorSpec("sr", "int64", ())]) == 1


def test_a_map_may_differ_in_a_few_pixels_and_nothing_else_may():
    """Another CPU's kernels flip a few pixels of a steep probability map (DBNet's head) far from the
    expected ones; that is the map the gate judged. A classifier's logits, or many pixels, are refused."""
    from agent.model import MAP_FAR_FRACTION, tolerance_miss

    expected = np.random.default_rng(0).uniform(0, 1, (4, 1, 32, 32)).astype(np.float32)
    tolerance = {"atol": 0.05, "rtol": 1e-3}
    few = expected.copy()
    few.flat[:int(expected.size * MAP_FAR_FRACTION)] = 1 - few.flat[:int(expected.size * MAP_FAR_FRACTION)] + 0.1
    many = expected.copy()
    many.flat[:int(expected.size * MAP_FAR_FRACTION * 2)] += 0.5
    assert tolerance_miss(expected, expected + 0.01, tolerance, None) is None
    assert tolerance_miss(expected, few, tolerance, "map") is None
    assert "of its values" in tolerance_miss(expected, few, tolerance, "classes")
    assert "3.98% of its values" in tolerance_miss(expected, many, tolerance, "map")


def test_the_daemons_spinning_threads_stop_when_a_run_returns(tmp_path):
    """Spinning allowed as the daemon allows it: ORT's threads spin during a run and stop when it
    returns (the event loop needs the cores between runs); not allowed: no spinning at all; ORT's own
    default (the converter's accuracy runs) sets neither; a session the converter times (``spinning=False``) never
    spins, whatever the default."""
    import onnx
    from onnx import TensorProto, helper

    from agent.runtime import onnx_backend
    from agent.runtime.onnx_backend import OnnxBackend, allow_spinning

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    saved = dict(onnx_backend.SPINNING)

    def entries(**spinning):
        options = OnnxBackend(path, threads=2, **spinning).session.get_session_options()

        def entry(key):
            try:
                return options.get_session_config_entry(key)
            except RuntimeError:  # not set
                return None

        return entry("session.intra_op.allow_spinning"), entry("session.force_spinning_stop")

    try:
        assert entries() == (None, None)
        assert entries(spinning=False) == ("0", None)
        allow_spinning(True, between_runs=False)
        assert entries() == (None, "1")
        assert entries(spinning=False) == ("0", None)
        allow_spinning(False)
        assert entries() == ("0", None)
    finally:
        onnx_backend.SPINNING.update(saved)
