"""Shadow and A/B on the real daemon: a candidate compared with the active version off the request
path, and a sticky percentage split between two versions."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import yaml

from edgepack.bundle import open_bundle

from .daemon import Daemon
from .test_rollout_e2e import wait_for


def _session_outputs(bundle, images):
    import onnxruntime as ort

    with open_bundle(bundle) as opened:
        session = ort.InferenceSession(opened.read_file(opened.manifest["model_file"]), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": images[i:i + 1]})[0] for i in range(len(images))])



def test_shadow_reports_the_offline_agreement_and_never_changes_an_answer(serving_bundles, digits, tmp_path):
    """fp32 1.0.0 active, int8 2.0.0 in shadow: every answer is the active version's; the agreement the
    daemon reports equals the gate's comparison of the two bundles on the same inputs."""
    from converters.gate import compare_output

    active, candidate = serving_bundles[0], serving_bundles[1]
    with np.load(digits / "validation.npz") as data:
        images = data["input"][:120].astype(np.float32)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "digits", "shadow": {
        "bundle": str(candidate), "queue": 512, "cpu_share": 1.0}}]}))
    expected = _session_outputs(active, images)
    offline = compare_output("scores", expected, _session_outputs(candidate, images))
    with Daemon("--config", config, "--bundle", active) as daemon:
        client = triton.InferenceServerClient(daemon.address)
        metadata = client.get_model_metadata("digits")
        assert metadata["versions"] == ["1.0.0"]  # the versions that answer; the shadow is in the roles
        assert metadata["parameters"]["roles"] == {"1.0.0": "active", "2.0.0": "shadow"}
        name = metadata["outputs"][0]["name"]
        got = []
        for index in range(len(images)):
            tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(images[index:index + 1], binary_data=index % 2 == 0)
            result = client.infer("digits", [tensor])
            assert result.get_response()["model_version"] == "1.0.0"  # the shadow never answers
            got.append(result.as_numpy(name))
        np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-5, atol=1e-5)
        report = wait_for(lambda: (r := httpx.get(f"{daemon.url}/v2/models/digits/shadow").json())
                           ["requests"].get("compared", 0) >= len(images) and r)
        assert report["active"] == "1.0.0" and report["version"] == "2.0.0" and report["state"] == "running"
        assert report["requests"] == {"offered": len(images), "compared": len(images)}
        figures = report["outputs"][name]
        assert figures["kind"] == "classes" and figures["samples"] == len(images)
        assert figures["top1_agreement"] == pytest.approx(offline.top1_agreement, abs=1e-9)
        assert figures["confident_samples"] == offline.confident_samples
        assert figures["confident_agreement"] == pytest.approx(offline.confident_agreement, abs=1e-9)
        assert figures["cosine"] == pytest.approx(offline.cosine, abs=1e-6)
        assert figures["max_abs_error"] == pytest.approx(offline.max_abs_error, rel=1e-5)
        assert report["agreement"] == pytest.approx(offline.top1_agreement)
        assert report["latency_s"]["p50"] > 0
        metrics = httpx.get(f"{daemon.url}/metrics").text
        gauge = re.search(r'edgepack_shadow_agreement\{model="digits",version="2.0.0"\} (\S+)', metrics)
        assert gauge and float(gauge.group(1)) == pytest.approx(offline.top1_agreement)
        assert f'edgepack_shadow_requests_total{{model="digits",outcome="compared",version="2.0.0"}} {len(images)}.0' in metrics
        # Triton's statistics count only what answered: the active version
        stats = client.get_inference_statistics("digits")["model_stats"]
        assert [(s["version"], s["inference_stats"]["success"]["count"]) for s in stats] == [("1.0.0", len(images))]
        assert daemon.stop() == 0


def test_shadow_of_another_model_or_other_inputs_is_one_line_at_start(serving_bundles, fleet_bundles, tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "digits", "shadow": {
        "bundle": str(fleet_bundles["bundles"][("1.0.0", "x86-64")])}}]}))
    with pytest.raises(RuntimeError) as failed:
        Daemon("--config", config, "--bundle", serving_bundles[0])
    message = [line for line in str(failed.value).splitlines() if "shadow" in line]
    assert message and "it is model 'fleet', not 'digits'" in message[-1], str(failed.value)
    assert "Traceback" not in str(failed.value)


def test_split_sends_a_sticky_share_of_clients_to_the_b_version(fleet_bundles):
    """20% of 2,000 client ids land on 1.1.0 within 3 points; a client id always meets the same version,
    over HTTP (header or parameter) and gRPC."""
    import tritonclient.grpc as triton_grpc

    bundles = fleet_bundles["bundles"]
    with Daemon("--bundle", bundles[("1.0.0", "x86-64")], "--split", f"{bundles[('1.1.0', 'x86-64')]}=20",
                "--grpc-port", "0") as daemon:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}]}
        versions = {}
        with httpx.Client(base_url=daemon.url) as http:
            assert http.get("/v2/models/fleet").json()["parameters"] == {
                "roles": {"1.0.0": "active", "1.1.0": "b"}, "split_percent": 20.0}
            for index in range(2000):
                answer = http.post("/v2/models/fleet/infer", json=body, headers={"edgepack-client-id": f"client-{index}"})
                assert answer.status_code == 200, answer.text
                versions[index] = answer.json()["model_version"]
            share = sum(v == "1.1.0" for v in versions.values()) / len(versions)
            assert 0.17 <= share <= 0.23, share
            for index in range(0, 2000, 97):  # sticky: again by header, and by the client_id parameter
                again = http.post("/v2/models/fleet/infer", json=body, headers={"edgepack-client-id": f"client-{index}"})
                assert again.json()["model_version"] == versions[index]
                by_parameter = http.post("/v2/models/fleet/infer", json={**body, "parameters": {"client_id": f"client-{index}"}})
                assert by_parameter.json()["model_version"] == versions[index]
            # the B version can be asked for by name
            assert http.post("/v2/models/fleet/versions/1.1.0/infer", json=body).json()["model_version"] == "1.1.0"
            stats = {s["version"]: s["inference_stats"]["success"]["count"]
                     for s in http.get("/v2/models/fleet/stats").json()["model_stats"]}
            assert set(stats) == {"1.0.0", "1.1.0"} and sum(stats.values()) == 2000 + 2 * 21 + 1
            metrics = http.get("/metrics").text
            assert 'edgepack_split_requests_total{model="fleet",role="b",version="1.1.0"}' in metrics
        client = triton_grpc.InferenceServerClient(daemon.grpc_address)
        for index in range(0, 2000, 211):
            tensor = triton_grpc.InferInput("input", [1, 8], "FP32")
            tensor.set_data_from_numpy(np.full((1, 8), 0.5, np.float32))
            result = client.infer("fleet", [tensor], headers={"edgepack-client-id": f"client-{index}"})
            assert result.get_response().model_version == versions[index]
        assert daemon.stop() == 0


def test_a_swap_re_checks_the_shadow_and_the_b_version(fleet_bundles, tmp_path):
    """An install swaps the active version under a configured shadow and split: a shadow that still
    fits compares against the new active version from zero; a B or shadow version that is now the
    active one is dropped (one log line each), and answers never fail."""
    from ..conftest import run_cli

    bundles = fleet_bundles["bundles"]
    store = tmp_path / "store"
    installed = run_cli("install", bundles[("1.0.0", "x86-64")], "--store", store, program="edgepack-agent")
    assert installed.returncode == 0, installed.stderr
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}]}
    with Daemon("--store", store, "--shadow", bundles[("1.1.0", "x86-64")],
                "--split", f"{bundles[('1.2.0', 'x86-64')]}=50") as daemon, httpx.Client(base_url=daemon.url) as http:
        for index in range(20):
            assert http.post("/v2/models/fleet/infer", json=body, headers={"edgepack-client-id": f"c{index}"}).status_code == 200
        first = wait_for(lambda: (r := http.get("/v2/models/fleet/shadow").json())["requests"].get("compared") and r)
        assert first["active"] == "1.0.0"
        assert http.get("/v2/models/fleet").json()["parameters"]["roles"] == {"1.0.0": "active", "1.2.0": "b",
                                                                             "1.1.0": "shadow"}
        # 1.2.0 (the B version) becomes active: the split is dropped; the shadow (1.1.0) still fits and
        # starts again against 1.2.0
        assert run_cli("install", bundles[("1.2.0", "x86-64")], "--store", store, program="edgepack-agent").returncode == 0
        wait_for(lambda: http.get("/v2/models/fleet/shadow").json().get("active") == "1.2.0")
        restarted = http.get("/v2/models/fleet/shadow").json()  # new sums (the request counts stay cumulative)
        assert restarted["agreement"] is None and all(o["samples"] == 0 for o in restarted["outputs"].values())
        assert http.get("/v2/models/fleet").json()["parameters"]["roles"] == {"1.2.0": "active", "1.1.0": "shadow"}
        # 1.1.0 (the shadow) becomes active: dropped too
        assert run_cli("install", bundles[("1.1.0", "x86-64")], "--store", store, program="edgepack-agent").returncode == 0
        wait_for(lambda: http.get("/v2/models/fleet/shadow").status_code == 404)
        for index in range(20):
            answer = http.post("/v2/models/fleet/infer", json=body, headers={"edgepack-client-id": f"c{index}"})
            assert answer.status_code == 200 and answer.json()["model_version"] == "1.1.0"
        dropped = [e for e in daemon.logs if e.get("msg") in ("split version dropped", "shadow version dropped")]
        assert [e["msg"] for e in dropped] == ["split version dropped", "shadow version dropped"], dropped
        def served_again(version: str) -> list:
            """Install ``version``, ask until it answers and twice more; Triton's (version, successes)."""
            assert run_cli("install", bundles[(version, "x86-64")], "--store", store, program="edgepack-agent").returncode == 0
            wait_for(lambda: http.post("/v2/models/fleet/infer", json=body).json()["model_version"] == version)
            for _ in range(2):
                assert http.post("/v2/models/fleet/infer", json=body).status_code == 200
            stats = http.get("/v2/models/fleet/stats").json()["model_stats"]
            return [(s["version"], s["inference_stats"]["success"]["count"]) for s in stats]

        # 1.0.0 was unloaded two swaps ago: back again, its statistics start from zero, as Triton's do
        assert served_again("1.0.0") == [("1.0.0", 3)]
        # 1.1.0, swapped out by that install (its statistics kept while it drained), back at once: from zero too
        assert served_again("1.1.0") == [("1.1.0", 3)]
        assert daemon.stop() == 0
