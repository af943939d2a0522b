"""Zero-downtime swaps: a probe calls infer every 10 ms while a new version is installed and activated."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import numpy as np

from edgepack.atomic import write_json_atomic

from ..conftest import run_cli
from .daemon import Daemon


def _probe(url: str, body: bytes, stop: threading.Event, seen: list) -> None:
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            try:
                response = client.post(url, content=body)
                data = response.json()
                if response.status_code != 200:
                    seen.append(("error", response.status_code, data))
                else:
                    seen.append((data["model_version"], tuple(np.round(data["outputs"][0]["data"], 5))))
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                seen.append(("error", type(exc).__name__, str(exc)))
            time.sleep(0.01)


def test_install_while_serving_switches_once_without_errors(serving_bundles, tmp_path, digits):
    first, second, _ = serving_bundles
    store = tmp_path / "store"
    assert run_cli("install", first, "--store", store, program="edgepack-agent").returncode == 0
    image = np.load(digits / "validation.npz")["input"][:1]
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                   "data": image.ravel().tolist()}]}).encode()
    with Daemon("--store", store) as running:
        url = f"{running.url}/v2/models/digits/infer"
        stop, seen = threading.Event(), []
        prober = threading.Thread(target=_probe, args=(url, body, stop, seen))
        prober.start()
        time.sleep(1.0)
        installed = run_cli("install", second, "--store", store, program="edgepack-agent")
        assert installed.returncode == 0, installed.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (seen and seen[-1][0] == "2.0.0"):
            time.sleep(0.05)
        time.sleep(1.0)
        rolled = run_cli("rollback", "--store", store, program="edgepack-agent")  # and back again
        assert rolled.returncode == 0, rolled.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and seen[-1][0] != "1.0.0":
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        prober.join()
        metrics = httpx.get(f"{running.url}/metrics").text
        assert running.stop() == 0
    errors = [entry for entry in seen if entry[0] == "error"]
    assert not errors, errors[:5]
    versions = [entry[0] for entry in seen]
    changes = [(a, b) for a, b in zip(versions, versions[1:]) if a != b]
    assert changes == [("1.0.0", "2.0.0"), ("2.0.0", "1.0.0")], changes
    outputs = {version: {entry[1] for entry in seen if entry[0] == version} for version in ("1.0.0", "2.0.0")}
    assert len(outputs["1.0.0"]) == 1 and len(outputs["2.0.0"]) == 1  # each version answers consistently
    assert outputs["1.0.0"] != outputs["2.0.0"]  # and the int8 version really computes differently
    assert len(seen) > 100
    assert 'edgepack_model_swaps_total{model="digits"} 2.0' in metrics


def test_a_version_that_fails_to_load_keeps_the_old_one_serving(serving_bundles, tmp_path):
    first, second, _ = serving_bundles
    store = tmp_path / "store"
    assert run_cli("install", first, "--store", store, program="edgepack-agent").returncode == 0
    with Daemon("--store", store) as running:
        # A slot whose extracted model file rotted after install, switched to as an install would: the
        # daemon's own check must refuse it (staged in another store first, so the daemon never sees it whole).
        staging = tmp_path / "staging"
        assert run_cli("install", second, "--store", staging, program="edgepack-agent").returncode == 0
        staged = json.loads((staging / "models/digits/state.json").read_text())
        shutil.copytree(staging / "models/digits/slots" / staged["active"], store / "models/digits/slots/b")
        (store / "models/digits/slots/b/files/model/model.onnx").write_bytes(b"garbage")
        state = json.loads((store / "models/digits/state.json").read_text())
        state["slots"]["b"] = staged["slots"][staged["active"]]
        write_json_atomic(store / "models/digits/state.json", {**state, "active": "b", "previous": "a"})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.get("msg", "").startswith("new version failed") for e in running.logs):
            time.sleep(0.05)
        failure = next(e for e in running.logs if e.get("msg", "").startswith("new version failed"))
        assert "corrupted" in failure["error"]
        response = httpx.post(f"{running.url}/v2/models/digits/infer",
                              json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]})
        assert response.status_code == 200 and response.json()["model_version"] == "1.0.0"
        assert running.stop() == 0
