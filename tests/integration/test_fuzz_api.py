"""Fuzzed HTTP requests against the real daemon: never a 5xx, never a crash, memory stable."""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.serving.oip import DATATYPES

from .daemon import Daemon

scalars = st.none() | st.booleans() | st.integers(-2**66, 2**66) | st.floats() | st.text(max_size=6)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=25)
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["input", "x", ""]) | values,
     "datatype": st.sampled_from(sorted(DATATYPES)) | values,  # every OIP datatype
     "shape": st.sampled_from([[1, 1, 8, 8], [2, 1, 8, 8], [0, 1, 8, 8], [1, 64]]) | st.lists(st.integers(-1, 70), max_size=5) | values},
    optional={"data": st.lists(st.floats(width=32) | st.integers(-5, 5), min_size=0, max_size=140) | values,
              "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-1, 600) | values})},
)
bodies = st.fixed_dictionaries({}, optional={
    "inputs": st.lists(tensors, max_size=3) | values,
    "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["linear", "nope"]) | values},
                                              optional={"parameters": values}), max_size=2) | values,
    "id": values, "parameters": values,
})


# The families that once answered 500 or stalled: BYTES data that does not fill its shape, JSON nested
# far past any parser's recursion limit, shapes no body can fill, binary blocks that disagree with their
# shape (every datatype), header lengths past the end of the body.
hostile = st.one_of(
    st.builds(lambda n, shape: json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": shape,
                                                       "data": ["a"] * n}]}).encode(),
              st.integers(0, 6), st.lists(st.integers(0, 3), max_size=3)),
    st.builds(lambda d: b"[" * d + b"]" * d, st.integers(1000, 100_000)),
    st.builds(lambda d: b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": '
              + b"[" * d + b"1" + b"]" * d + b"}]}", st.integers(1000, 100_000)),
    st.builds(lambda shape, t: json.dumps({"inputs": [{"name": "input", "datatype": t, "shape": shape,
                                                       "data": [1]}]}).encode(),
              st.lists(st.integers(2**20, 2**62), min_size=1, max_size=4), st.sampled_from(sorted(DATATYPES))),
    st.builds(lambda t, shape, size: json.dumps({"inputs": [{"name": "input", "datatype": t, "shape": shape,
                                                             "parameters": {"binary_data_size": size}}]}).encode(),
              st.sampled_from(sorted(DATATYPES)), st.lists(st.integers(0, 8), max_size=4), st.integers(0, 400)),
)


def _rss_kb(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


def test_fuzzed_requests_never_5xx(serving_bundles):
    with Daemon("--bundle", serving_bundles[0]) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        def warm(count):
            for _ in range(count):
                client.post("/v2/models/digits/infer", json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.1] * 64}]})

        warm(300)
        before = _rss_kb(running.process.pid)
        statuses = []

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=bodies | hostile, tail=st.binary(max_size=300), binary=st.booleans(),
               path=st.sampled_from(["/v2/models/digits/infer", "/v2/models/digits/versions/1.0.0/infer",
                                     "/v2/models/digits/versions/9/infer", "/v2/models/%00/infer", "/v2/models/digits"]),
               encoding=st.sampled_from([None, "gzip", "deflate", "br"]))
        def fuzz(body, tail, binary, path, encoding):
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {}
            if binary:
                headers["Inference-Header-Content-Length"] = str(len(raw))
                raw += tail
            if encoding:
                headers["Content-Encoding"] = encoding
            response = client.post(path, content=raw, headers=headers)
            statuses.append(response.status_code)
            assert response.status_code < 500, (response.status_code, response.text, body)
            if response.status_code != 200:
                assert "error" in response.json()

        fuzz()
        warm(300)
        after = _rss_kb(running.process.pid)
        assert running.process.poll() is None
        assert client.get("/v2/health/ready").status_code == 200
        assert running.stop() == 0
    assert 400 in statuses
    assert after - before < 30_000, f"RSS grew by {after - before} kB over the fuzz run"
