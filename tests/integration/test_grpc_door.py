"""OIP v2 over gRPC against the real daemon (``--grpc-port``), driven by the installed
``tritonclient.grpc`` the way Triton's example clients use it (``src/python/examples``:
simple_grpc_infer_client.py, simple_grpc_async_infer_client.py, simple_grpc_aio_infer_client.py,
simple_grpc_stream_infer_client-style streaming), nothing vendored; plus the token, TLS, a full
queue, a port in use and a fuzz of raw bodies."""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from ..conftest import run_cli
from .daemon import Daemon

METHOD = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def daemon(simple_bundle):
    with Daemon("--bundle", simple_bundle, "--grpc-port", "0") as running:
        yield running
        assert running.stop() == 0


def _inputs():
    input0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    input1 = np.ones((1, 16), dtype=np.int32)
    tensors = [triton.InferInput("INPUT0", [1, 16], "INT32"), triton.InferInput("INPUT1", [1, 16], "INT32")]
    tensors[0].set_data_from_numpy(input0)
    tensors[1].set_data_from_numpy(input1)
    return input0, input1, tensors


def _check_sums(result, input0, input1) -> None:
    # simple_grpc_infer_client.py: "sync infer error: incorrect sum/difference" -> exit 1
    assert np.array_equal(result.as_numpy("OUTPUT0"), input0 + input1)
    assert np.array_equal(result.as_numpy("OUTPUT1"), input0 - input1)


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_the_grpc_example_client_runs_to_its_end(daemon, compression):
    client = triton.InferenceServerClient(daemon.grpc_address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("simple")
    assert not client.is_model_ready("nope")
    input0, input1, tensors = _inputs()
    outputs = [triton.InferRequestedOutput("OUTPUT0"), triton.InferRequestedOutput("OUTPUT1")]
    result = client.infer("simple", tensors, outputs=outputs, request_id="req-7", compression_algorithm=compression)
    _check_sums(result, input0, input1)
    assert result.get_response().id == "req-7" and result.get_response().model_version == "1.0.0"
    statistics = client.get_inference_statistics(model_name="simple")
    assert len(statistics.model_stats) == 1, statistics  # the example's own check
    stats = statistics.model_stats[0]
    assert stats.name == "simple" and stats.inference_stats.success.count >= 1 and stats.execution_count >= 1


def test_metadata_config_and_index_say_what_http_says(daemon):
    client = triton.InferenceServerClient(daemon.grpc_address)
    over_http = httpx.get(f"{daemon.url}/v2/models/simple", timeout=10).json()
    metadata = client.get_model_metadata("simple", as_json=True)
    assert metadata["name"] == over_http["name"] and metadata["versions"] == over_http["versions"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]] == \
        [(t["name"], t["datatype"], t["shape"]) for t in over_http["inputs"]]
    config = client.get_model_config("simple", as_json=True)["config"]
    http_config = httpx.get(f"{daemon.url}/v2/models/simple/config", timeout=10).json()
    assert config["max_batch_size"] == http_config["max_batch_size"] > 1
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == \
        [(t["name"], t["data_type"], t["dims"]) for t in http_config["input"]] == \
        [("INPUT0", "TYPE_INT32", [16]), ("INPUT1", "TYPE_INT32", [16])]
    assert config["parameters"]["max_queue_size"]["string_value"] == http_config["parameters"]["max_queue_size"]["string_value"]
    server = client.get_server_metadata()
    assert server.name == "edgepack-agent" and "statistics" in server.extensions
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state) for m in index.models] == [("simple", "1.0.0", "READY")]
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope' is not found") as error:
        client.get_model_metadata("nope")
    assert error.value.status() == "StatusCode.NOT_FOUND"


def test_the_async_aio_and_streaming_clients(daemon):
    client = triton.InferenceServerClient(daemon.grpc_address)
    input0, input1, tensors = _inputs()
    done: queue.Queue = queue.Queue()
    for _ in range(8):  # simple_grpc_async_infer_client.py: a callback per request
        client.async_infer("simple", tensors, callback=lambda result, error: done.put((result, error)))
    for _ in range(8):
        result, error = done.get(timeout=30)
        assert error is None
        _check_sums(result, input0, input1)

    import tritonclient.grpc.aio as aio

    async def run():
        async with aio.InferenceServerClient(daemon.grpc_address) as aclient:
            assert await aclient.is_model_ready("simple")
            results = await asyncio.gather(*[aclient.infer("simple", tensors) for _ in range(4)])
            return results, await aclient.get_inference_statistics("simple")

    results, stats = asyncio.run(run())
    for result in results:
        _check_sums(result, input0, input1)
    assert len(stats.model_stats) == 1

    # Triton's bidirectional stream: every answer with its id; a bad request's error does not end it
    streamed: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: streamed.put((result, error)))
    try:
        for index in range(6):
            client.async_stream_infer("simple", tensors, request_id=f"s{index}")
        client.async_stream_infer("nope", tensors, request_id="bad")
        client.async_stream_infer("simple", tensors, request_id="after")
        seen, errors = set(), []
        for _ in range(8):
            result, error = streamed.get(timeout=30)
            if error is not None:
                errors.append(str(error))
            else:
                _check_sums(result, input0, input1)
                seen.add(result.get_response().id)
    finally:
        client.stop_stream()
    assert seen == {f"s{i}" for i in range(6)} | {"after"}
    assert len(errors) == 1 and "Request for unknown model: 'nope'" in errors[0]


def test_grpc_and_http_count_into_the_same_statistics(daemon):
    client = triton.InferenceServerClient(daemon.grpc_address)
    before = client.get_inference_statistics("simple").model_stats[0].inference_stats.success.count
    input0, input1, tensors = _inputs()
    for _ in range(3):
        client.infer("simple", tensors)
    body = {"inputs": [{"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))} for n in ("INPUT0", "INPUT1")]}
    assert httpx.post(f"{daemon.url}/v2/models/simple/infer", json=body, timeout=10).status_code == 200
    over_http = httpx.get(f"{daemon.url}/v2/models/simple/stats", timeout=10).json()["model_stats"][0]
    after = client.get_inference_statistics("simple", "1.0.0").model_stats[0].inference_stats.success.count
    assert after - before == 4 and over_http["inference_stats"]["success"]["count"] == after


def test_token_and_tls_over_grpc(serving_bundles, tmp_path):
    from .tls import self_signed

    cert, key = self_signed(tmp_path)
    token = "s3cret-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"server": {"host": "0.0.0.0", "token_file": "token", "tls_cert": cert.name,
                                                 "tls_key": key.name, "grpc_port": 0}}))
    with Daemon("--config", config, "--bundle", serving_bundles[0]) as running:
        client = triton.InferenceServerClient(running.grpc_address, ssl=True, root_certificates=str(cert))
        assert client.is_server_live() and client.is_server_ready()  # probes stay open, as over HTTP
        with pytest.raises(InferenceServerException, match="bearer token") as refused:
            client.get_model_metadata("digits")
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.get_model_metadata("digits", headers={"authorization": "Bearer wrong-token-000000"})
        good = {"authorization": f"Bearer {token}"}
        assert client.get_model_metadata("digits", headers=good).name == "digits"
        image = triton.InferInput("input", [1, 1, 8, 8], "FP32")
        image.set_data_from_numpy(np.full((1, 1, 8, 8), 0.5, np.float32))
        assert client.infer("digits", [image], headers=good).as_numpy(
            client.get_model_metadata("digits", headers=good).outputs[0].name).shape[0] == 1
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.infer("digits", [image])
        # plaintext against the TLS port fails to connect, it is not served in the clear
        plain = triton.InferenceServerClient(running.grpc_address)
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=3)
        assert running.stop() == 0


def test_a_grpc_port_in_use_is_one_line_error(serving_bundles):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", "--bundle", serving_bundles[0], "--port", "0", "--grpc-port", str(port),
                         program="edgepack-agent")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot listen for gRPC on 127.0.0.1:{port}; choose another server.grpc_port or stop "
                      "the process using it"], result.stderr
    assert "Traceback" not in result.stderr


def test_a_full_queue_is_unavailable_with_retry_after_and_health_stays_fast(serving_bundles, tmp_path, digits):
    with np.load(digits / "validation.npz") as data:
        rows = np.concatenate([data["input"].astype(np.float32)] * 7)[:2500]
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "digits", "threads": 1, "max_queue_size": 1,
                                                  "max_samples_per_request": 100_000, "batching": {"enabled": False}}],
                                      "server": {"grpc_port": 0}}))
    with Daemon("--config", config, "--bundle", serving_bundles[0]) as running:
        channel = grpc.insecure_channel(running.grpc_address)
        infer = channel.unary_unary(METHOD, request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=service_pb2.ModelInferResponse.FromString)
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=service_pb2.ServerLiveResponse.FromString)
        request = service_pb2.ModelInferRequest(model_name="digits")
        request.inputs.add(name="input", datatype="FP32", shape=rows.shape)
        request.raw_input_contents.append(rows.tobytes())
        probes, stop = [], threading.Event()

        def probe():
            while not stop.is_set():
                started = time.perf_counter()
                assert live(service_pb2.ServerLiveRequest(), timeout=10).live
                probes.append(time.perf_counter() - started)
                time.sleep(0.02)

        def call(_):
            try:
                return infer.with_call(request, timeout=60)[1].code(), None
            except grpc.RpcError as error:
                return error.code(), error

        prober = threading.Thread(target=probe)
        prober.start()
        with ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(call, range(48)))
        stop.set()
        prober.join()
        codes = [code for code, _ in outcomes]
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        refused = [error for code, error in outcomes if code == grpc.StatusCode.UNAVAILABLE]
        assert refused and codes.count(grpc.StatusCode.OK) >= 2, codes
        assert "max_queue_size 1" in refused[0].details()
        assert int(dict(refused[0].trailing_metadata())["retry-after"]) >= 1
        assert probes and max(probes) < 1.0, max(probes)
        metrics = httpx.get(f"{running.url}/metrics", timeout=10).text
        overloaded = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                         if line.startswith("edgepack_requests_total") and 'outcome="overloaded"' in line)
        assert overloaded == len(refused)
        channel.close()
        assert running.stop() == 0


# -- fuzz ---------------------------------------------------------------------------------------------

names = st.sampled_from(["digits", "nope", ""]) | st.text(max_size=8)
datatypes = st.sampled_from(["FP32", "FP16", "INT64", "INT8", "BYTES", "BOOL", "UINT8", "nope", ""])
shapes = st.sampled_from([[1, 1, 8, 8], [2, 1, 8, 8], [0, 1, 8, 8], [1, 64]]) | st.lists(st.integers(-3, 70), max_size=5) \
    | st.lists(st.integers(2**40, 2**62), min_size=1, max_size=3)


@st.composite
def infer_requests(draw) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=draw(names), model_version=draw(st.sampled_from(["", "1.0.0", "9"])),
                                            id=draw(st.text(max_size=4)))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(st.sampled_from(["input", "x", ""])), datatype=draw(datatypes),
                                    shape=draw(shapes))
        if raw:
            request.raw_input_contents.append(draw(st.binary(max_size=600)))
        else:
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=140)))
            tensor.contents.int_contents.extend(draw(st.lists(st.integers(-2**31, 2**31 - 1), max_size=4)))
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=4), max_size=3)))
    if draw(st.booleans()):
        request.raw_input_contents.append(draw(st.binary(max_size=16)))  # one too many
    for key in draw(st.lists(st.sampled_from(["timeout", "priority", "binary_data_output"]), max_size=2)):
        request.parameters[key].int64_param = draw(st.integers(-2**63, 2**63 - 1))
    for output in draw(st.lists(st.sampled_from(["linear", "nope"]), max_size=2)):
        request.outputs.add(name=output)
    return request.SerializeToString()


def test_fuzzed_grpc_requests_never_internal(serving_bundles):
    with Daemon("--bundle", serving_bundles[0], "--grpc-port", "0") as running:
        channel = grpc.insecure_channel(running.grpc_address)
        infer = channel.unary_unary(METHOD)  # raw bytes both ways
        codes = []

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=infer_requests() | st.binary(max_size=300), tail=st.binary(max_size=40))
        def fuzz(body, tail):
            try:
                infer(body + tail if tail and not body else body, timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
                assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                        grpc.StatusCode.RESOURCE_EXHAUSTED), (error.code(), error.details())
                assert error.details() and "\n" not in error.details()

        fuzz()
        assert running.process.poll() is None
        assert triton.InferenceServerClient(running.grpc_address).is_server_ready()
        assert grpc.StatusCode.INVALID_ARGUMENT in codes and grpc.StatusCode.NOT_FOUND in codes
        errors = [entry for entry in running.logs if entry.get("level") == "error"]
        assert not errors, json.dumps(errors[:3])
        channel.close()
        assert running.stop() == 0


def test_sigterm_drains_grpc_calls_alongside_http(serving_bundles, tmp_path):
    config = tmp_path / "agent.yaml"
    # A long queue delay keeps the calls in flight when SIGTERM arrives.
    config.write_text(yaml.safe_dump({"models": [{"name": "digits", "batching": {"max_batch_size": 64, "max_queue_delay_ms": 1500}}],
                                      "server": {"grpc_port": 0}}))
    with Daemon("--config", config, "--bundle", serving_bundles[0]) as running:
        client = triton.InferenceServerClient(running.grpc_address)
        image = triton.InferInput("input", [1, 1, 8, 8], "FP32")
        image.set_data_from_numpy(np.full((1, 1, 8, 8), 0.1, np.float32))
        output = client.get_model_metadata("digits").outputs[0].name
        outcomes = []

        def call():
            try:
                outcomes.append(client.infer("digits", [image], client_timeout=30).as_numpy(output).shape)
            except InferenceServerException as error:
                outcomes.append(error.status())

        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.7)
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # no new calls once the shutdown started, while the admitted ones finish
        with pytest.raises(InferenceServerException):
            triton.InferenceServerClient(running.grpc_address).infer("digits", [image], client_timeout=5)
        for thread in threads:
            thread.join()
        assert running.stop() == 0
        assert time.monotonic() - started < 10
    assert outcomes == [(1, 10)] * 4, outcomes
