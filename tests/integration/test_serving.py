"""The real daemon in a subprocess, driven by the official Triton client and by plain HTTP."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from edgepack.bundle import open_bundle

from ..conftest import run_cli
from .daemon import Daemon


def _reference(bundle, images):
    import onnxruntime as ort

    with open_bundle(bundle) as opened:
        session = ort.InferenceSession(opened.read_file(opened.manifest["model_file"]), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0]


@pytest.fixture(scope="module")
def images(digits):
    with np.load(digits / "validation.npz") as data:
        return data["input"][:16].astype(np.float32)


@pytest.fixture(scope="module")
def daemon(serving_bundles):
    with Daemon("--bundle", serving_bundles[0]) as running:
        yield running
        assert running.stop() == 0


def test_tritonclient_json_and_binary(daemon, serving_bundles, images):
    client = triton.InferenceServerClient(daemon.address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    metadata = client.get_model_metadata("digits")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert metadata["versions"] == ["1.0.0"]
    output_name = metadata["outputs"][0]["name"]
    assert client.get_model_config("digits")["max_batch_size"] == 8
    expected = _reference(serving_bundles[0], images)
    for binary_in in (True, False):
        for binary_out in (True, False):
            tensor = triton.InferInput("input", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images, binary_data=binary_in)
            result = client.infer("digits", [tensor], outputs=[triton.InferRequestedOutput(output_name, binary_data=binary_out)],
                                  request_id="r1")
            got = result.as_numpy(output_name)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
            response = result.get_response()
            assert response["model_version"] == "1.0.0" and response["id"] == "r1"
            assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out


def test_bad_requests_are_400_with_a_named_tensor(daemon):
    def infer(body, **kwargs):
        return httpx.post(f"{daemon.url}/v2/models/digits/infer", content=body, timeout=10, **kwargs)

    good = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}
    cases = {
        "wrong shape": ({**good, "shape": [1, 8, 8]}, "needs rank 4"),
        "wrong size": ({**good, "shape": [1, 1, 8, 7]}, "'input'"),
        "wrong dtype": ({**good, "datatype": "INT64", "data": [1] * 64}, "datatype INT64 does not match the model's FP32"),
        "wrong name": ({**good, "name": "image"}, "unknown input 'image'"),
        "count mismatch": ({**good, "data": [0.5] * 63}, "holds 63 values but shape needs 64"),
        "strings for floats": ({**good, "data": ["x"] * 64}, "list of FP32 values"),
        "unknown datatype": ({**good, "datatype": "FLOAT"}, "unknown datatype 'FLOAT'"),
    }
    for label, (tensor, needle) in cases.items():
        response = infer(json.dumps({"inputs": [tensor]}))
        assert response.status_code == 400, label
        assert needle in response.json()["error"], (label, response.json())
    nan = infer(json.dumps({"inputs": [{**good, "data": [float("nan")] * 64}]}))
    assert nan.status_code == 400 and "NaN or Inf" in nan.json()["error"]
    assert infer(b"{not json").status_code == 400
    assert infer(b"[]").status_code == 400
    header = json.dumps({"inputs": [{**{k: v for k, v in good.items() if k != "data"}, "parameters": {"binary_data_size": 256}}]}).encode()
    short = infer(header + b"\0" * 100, headers={"Inference-Header-Content-Length": str(len(header))})
    assert short.status_code == 400 and "runs past the end" in short.json()["error"]
    missing = httpx.post(f"{daemon.url}/v2/models/nope/infer", content=b"{}", timeout=10)
    assert missing.status_code == 404 and "Request for unknown model: 'nope' is not found" in missing.json()["error"]
    big = infer(b" " * (64 * 1024 * 1024 + 1))
    assert big.status_code == 413
    assert httpx.get(f"{daemon.url}/v2/health/live").status_code == 200  # still serving


def test_metrics_count_outcomes_and_batches(daemon):
    text = httpx.get(f"{daemon.url}/metrics").text
    assert 'edgepack_requests_total{model="digits",outcome="ok"}' in text
    assert 'edgepack_model_active{model="digits",slot="",version="1.0.0"} 1.0' in text
    for name in ("edgepack_queue_seconds_bucket", "edgepack_inference_seconds_bucket", "edgepack_request_seconds_bucket",
                 "edgepack_batch_size_bucket", "edgepack_model_load_seconds"):
        assert name in text


def test_dynamic_batching_merges_concurrent_requests(serving_bundles, images, tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("models:\n  - name: digits\n    batching: {max_batch_size: 16, max_queue_delay_ms: 20}\n")
    expected = _reference(serving_bundles[0], images)
    with Daemon("--config", config, "--bundle", serving_bundles[0]) as running:
        results: dict[int, np.ndarray] = {}

        def call(index):
            client = triton.InferenceServerClient(running.address)
            tensor = triton.InferInput("input", [1, 1, 8, 8], "FP32")
            tensor.set_data_from_numpy(images[index:index + 1])
            results[index] = client.infer("digits", [tensor]).as_numpy(client.get_model_metadata("digits")["outputs"][0]["name"])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        text = httpx.get(f"{running.url}/metrics").text
        assert running.stop() == 0
    for index in range(16):  # each caller got its own row back
        np.testing.assert_allclose(results[index][0], expected[index], rtol=1e-5, atol=1e-5)
    batches = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("edgepack_batch_size_count")))
    assert batches < 16, "concurrent requests were not merged into batches"


def test_sigterm_drains_in_flight_requests(serving_bundles, tmp_path):
    config = tmp_path / "agent.yaml"
    # A long queue delay keeps requests in flight when SIGTERM arrives.
    config.write_text("models:\n  - name: digits\n    batching: {max_batch_size: 64, max_queue_delay_ms: 1500}\n")
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.1] * 64}]})
    with Daemon("--config", config, "--bundle", serving_bundles[0]) as running:
        statuses = []

        def call():
            statuses.append(httpx.post(f"{running.url}/v2/models/digits/infer", content=body, timeout=30).status_code)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        running.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"{running.url}/v2/health/live", timeout=5)
        for thread in threads:
            thread.join()
        assert running.stop() == 0
    assert statuses == [200] * 4


def test_bearer_token_and_tls(serving_bundles, tmp_path):
    from .tls import self_signed

    cert, key = self_signed(tmp_path)
    token = "s3cret-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    config = tmp_path / "agent.yaml"
    config.write_text(f"server:\n  host: 0.0.0.0\n  token_file: token\n  tls_cert: {cert.name}\n  tls_key: {key.name}\n")
    with Daemon("--config", config, "--bundle", serving_bundles[0]) as running:
        assert running.scheme == "https"
        with httpx.Client(verify=str(cert), timeout=10) as client:
            assert client.get(f"{running.url}/v2/health/ready").status_code == 200  # probes stay open
            assert client.get(f"{running.url}/v2/models/digits").status_code == 401
            assert client.get(f"{running.url}/v2/models/digits", headers={"Authorization": "Bearer wrong"}).status_code == 401
            ok = client.get(f"{running.url}/v2/models/digits", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200 and ok.json()["name"] == "digits"
            assert client.get(f"{running.url}/metrics").status_code == 401
        assert running.stop() == 0


def test_exposed_without_token_is_refused(serving_bundles):
    result = run_cli("run", "--bundle", serving_bundles[0], "--host", "0.0.0.0", "--port", "0", program="edgepack-agent")
    assert result.returncode == 2
    assert "server: host '0.0.0.0' is not a loopback address: set token or token_file" in result.stderr
    assert "Traceback" not in result.stderr


def test_daemon_imports_no_converter_stack(serving_bundles, tmp_path):
    """The real daemon, after serving a request, has none of the host stack in sys.modules."""
    report = tmp_path / "modules.json"
    script = (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: open({str(report)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
        "from agent.cli import main\n"
        f"sys.argv = ['edgepack-agent', 'run', '--port', '0', '--bundle', {str(serving_bundles[0])!r}]\n"
        "main()\n"
    )
    with Daemon(python_code=script) as running:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}
        assert httpx.post(f"{running.url}/v2/models/digits/infer", json=body).status_code == 200
        assert running.stop() == 0
    modules = set(json.loads(report.read_text()))
    assert "onnxruntime" in modules and "uvicorn" in modules  # the probe saw the serving process
    for forbidden in ("torch", "onnx", "converters", "litert_torch", "tensorflow", "transformers", "onnxscript", "sklearn", "skl2onnx"):
        assert forbidden not in modules, forbidden


def test_several_models_side_by_side_from_the_store(serving_bundles, tmp_path, images):
    store = tmp_path / "store"
    for bundle in (serving_bundles[0], serving_bundles[2]):
        assert run_cli("install", bundle, "--store", store, program="edgepack-agent").returncode == 0
    with Daemon("--store", store) as running:
        client = triton.InferenceServerClient(running.address)
        answers = {}
        for name in ("digits", "digits-int8"):
            assert client.is_model_ready(name)
            tensor = triton.InferInput("input", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images)
            result = client.infer(name, [tensor])
            answers[name] = (result.get_response()["model_version"], result.as_numpy(result.get_response()["outputs"][0]["name"]))
        assert running.stop() == 0
    assert answers["digits"][0] == "1.0.0" and answers["digits-int8"][0] == "0.3.0"
    np.testing.assert_allclose(answers["digits"][1], _reference(serving_bundles[0], images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(answers["digits-int8"][1], _reference(serving_bundles[2], images), rtol=1e-5, atol=1e-5)
    assert (answers["digits"][1].argmax(1) == answers["digits-int8"][1].argmax(1)).mean() > 0.9
