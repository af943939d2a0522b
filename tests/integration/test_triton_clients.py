"""Triton's example clients' calls against the agent, on an ONNX model shaped like Triton's "simple"
model (INPUT0, INPUT1 INT32 [-1, 16] -> OUTPUT0 = sum, OUTPUT1 = difference).

What ``src/python/examples/simple_http_infer_client.py`` and its async/aio and compression variants do,
through the installed ``tritonclient`` APIs, nothing vendored: infer (JSON and binary, request and
response compression), check the sums, then ``get_inference_statistics`` and exit 1 unless it holds one
model's statistics (the check that failed against the agent before the statistics extension)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from .daemon import Daemon


@pytest.fixture(scope="module")
def daemon(simple_bundle):
    with Daemon("--bundle", simple_bundle) as running:
        yield running
        assert running.stop() == 0


def _inputs(binary: bool):
    input0 = np.arange(16, dtype=np.int32).reshape(1, 16)
    input1 = np.ones((1, 16), dtype=np.int32)
    tensors = [triton.InferInput("INPUT0", [1, 16], "INT32"), triton.InferInput("INPUT1", [1, 16], "INT32")]
    tensors[0].set_data_from_numpy(input0, binary_data=binary)
    tensors[1].set_data_from_numpy(input1, binary_data=binary)
    return input0, input1, tensors


def _check_sums(result, input0, input1) -> None:
    # simple_http_infer_client.py: "sync infer error: incorrect sum/difference" -> exit 1
    assert np.array_equal(result.as_numpy("OUTPUT0"), input0 + input1)
    assert np.array_equal(result.as_numpy("OUTPUT1"), input0 - input1)


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_the_sync_http_example_client_runs_to_its_end(daemon, binary, compression):
    client = triton.InferenceServerClient(daemon.address)
    input0, input1, tensors = _inputs(binary)
    outputs = [triton.InferRequestedOutput("OUTPUT0", binary_data=binary),
               triton.InferRequestedOutput("OUTPUT1", binary_data=binary)]
    result = client.infer("simple", tensors, outputs=outputs, request_compression_algorithm=compression,
                          response_compression_algorithm=compression)
    _check_sums(result, input0, input1)
    statistics = client.get_inference_statistics(model_name="simple")
    assert len(statistics["model_stats"]) == 1, statistics  # the example's own check
    stats = statistics["model_stats"][0]
    assert stats["name"] == "simple" and stats["version"] == "1.0.0"
    assert stats["inference_stats"]["success"]["count"] >= 1 and stats["inference_stats"]["success"]["ns"] > 0
    assert stats["execution_count"] >= 1 and stats["inference_count"] >= stats["execution_count"]
    assert stats["batch_stats"] and stats["batch_stats"][0]["compute_infer"]["count"] >= 1


def test_the_async_and_aio_example_clients(daemon):
    client = triton.InferenceServerClient(daemon.address, concurrency=4)
    input0, input1, tensors = _inputs(True)
    pending = [client.async_infer("simple", tensors) for _ in range(8)]
    for request in pending:
        _check_sums(request.get_result(), input0, input1)

    import tritonclient.http.aio as aio

    async def run():
        async with aio.InferenceServerClient(daemon.address) as aclient:
            assert await aclient.is_model_ready("simple")
            results = await asyncio.gather(*[aclient.infer("simple", tensors) for _ in range(4)])
            stats = await aclient.get_inference_statistics("simple")
            return results, stats

    results, stats = asyncio.run(run())
    for result in results:
        _check_sums(result, input0, input1)
    assert len(stats["model_stats"]) == 1


def test_statistics_count_what_was_served_and_unknown_models_answer_in_tritons_words(daemon):
    client = triton.InferenceServerClient(daemon.address)
    before = client.get_inference_statistics("simple")["model_stats"][0]
    input0, input1, tensors = _inputs(True)
    for _ in range(5):
        _check_sums(client.infer("simple", tensors), input0, input1)
    bad = httpx.post(f"http://{daemon.address}/v2/models/simple/infer", content=b"{not json", timeout=10)
    assert bad.status_code == 400
    after = client.get_inference_statistics("simple", "1.0.0")["model_stats"][0]
    success = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    assert success == 5
    # a request that fails before it reaches a model version (unparseable) is not a model's failure
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert after["inference_stats"][key]["count"] - before["inference_stats"][key]["count"] == 5, key
    assert after["inference_count"] - before["inference_count"] == 5
    every = client.get_inference_statistics()
    assert [entry["name"] for entry in every["model_stats"]] == ["simple"]
    for path in ("/v2/models/nope/stats", "/v2/models/simple/versions/9/stats", "/v2/models/nope/infer"):
        method = httpx.post if path.endswith("infer") else httpx.get
        answer = method(f"http://{daemon.address}{path}", timeout=10)
        assert answer.status_code == 404 and answer.json()["error"].startswith("Request for unknown model: '"), answer.text
    with pytest.raises(Exception, match="Request for unknown model: 'nope' is not found"):
        client.get_model_metadata("nope")
