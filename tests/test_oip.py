"""The Open Inference Protocol codec: JSON and binary tensors, validation, and fuzzing."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.serving.oip import DATATYPES, InferRequest, RequestError, decode_request, encode_response, validate_inputs
from edgepack.tensors import TensorSpec

SPECS = [TensorSpec("x", "float32", (None, 3)), TensorSpec("ids", "int64", (None,))]


def _binary(header: dict, *blobs: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), str(len(head))


def test_json_and_binary_decode_to_the_same_arrays():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([7, 9], dtype=np.int64)
    as_json = decode_request(json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": x.tolist()},  # nested is allowed
        {"name": "ids", "datatype": "INT64", "shape": [2], "data": ids.tolist()}]}).encode(), None)
    body, length = _binary({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
        {"name": "ids", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}}],
        "parameters": {"binary_data_output": True}}, x.tobytes(), ids.tobytes())
    as_binary = decode_request(body, length)
    for decoded in (as_json, as_binary):
        checked = validate_inputs(decoded.inputs, SPECS, allow_nonfinite=False)
        np.testing.assert_array_equal(checked["x"], x)
        np.testing.assert_array_equal(checked["ids"], ids)
    assert as_binary.binary_default and not as_json.binary_default


def test_binary_response_layout():
    request = InferRequest(id="7", inputs={}, outputs={"y": True, "label": False})
    outputs = {"y": np.array([[1.5, 2.5]], dtype=np.float32), "label": np.array([3], dtype=np.int64)}
    specs = [TensorSpec("y", "float32", (None, 2)), TensorSpec("label", "int64", (None,))]
    body, headers = encode_response("m", "1.0.0", request, outputs, specs)
    length = int(headers["inference-header-content-length"])
    header = json.loads(body[:length])
    assert header["id"] == "7" and header["model_version"] == "1.0.0"
    y, label = header["outputs"]
    assert y["parameters"]["binary_data_size"] == 8 and "data" not in y
    assert label["data"] == [3]
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32), [1.5, 2.5])


def test_bytes_tensors_round_trip():
    blob = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"xyz"))
    body, length = _binary({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(blob)}}]}, blob)
    decoded = decode_request(body, length)
    assert list(decoded.inputs["s"]) == [b"ab", b"", b"xyz"]
    out, headers = encode_response("m", "1", InferRequest(None, {}, {"s": True}), {"s": decoded.inputs["s"]},
                                   [TensorSpec("s", "str", (None,))])
    assert out.endswith(blob)


@pytest.mark.parametrize("body,needle", [
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2]}]}, "holds 2 values but shape needs 3"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, -3], "data": [1]}]}, "non-negative integers"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                 {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}, "given twice"),
    ({"inputs": [{"name": "ids", "datatype": "INT8", "shape": [1], "data": [300]}]}, "does not fit in INT8"),
    ({"inputs": [{"name": "ids", "datatype": "INT64", "shape": [1], "data": [1.5]}]}, "whole numbers"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}], "parameters": {"classification": 3}}, "classification"),
    ({"inputs": []}, "non-empty 'inputs'"),
])
def test_decode_errors_name_the_problem(body, needle):
    with pytest.raises(RequestError, match=needle):
        decode_request(json.dumps(body).encode(), None)


def test_validation_errors():
    good = {"x": np.zeros((2, 3), np.float32), "ids": np.zeros(2, np.int64)}
    with pytest.raises(RequestError, match="missing input 'ids'"):
        validate_inputs({"x": good["x"]}, SPECS, False)
    with pytest.raises(RequestError, match="batch size 3 differs"):
        validate_inputs({**good, "ids": np.zeros(3, np.int64)}, SPECS, False)
    with pytest.raises(RequestError, match="'x' holds NaN or Inf"):
        validate_inputs({**good, "x": np.full((2, 3), np.inf, np.float32)}, SPECS, False)
    assert validate_inputs({**good, "x": np.full((2, 3), np.nan, np.float32)}, SPECS, True)
    with pytest.raises(RequestError, match="needs size 3 on axis 1"):
        validate_inputs({**good, "x": np.zeros((2, 4), np.float32)}, SPECS, False)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "ids", "y", 3]), "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP16", "UINT8", "X"]) | json_values,
     "shape": st.lists(st.integers(-2, 5), max_size=4) | json_values},
    optional={"data": st.lists(st.floats() | st.integers(-300, 300) | st.text(max_size=3), max_size=12) | json_values,
              "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-4, 64) | json_values})},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=st.lists(tensor, max_size=3) | json_values, tail=st.binary(max_size=64), binary=st.booleans(),
       params=st.dictionaries(st.sampled_from(["binary_data_output", "classification", "x"]), json_values, max_size=2))
def test_fuzzed_requests_raise_only_request_errors(inputs, tail, binary, params):
    header = json.dumps({"inputs": inputs, "parameters": params}).encode()
    body, length = (header + tail, str(len(header))) if binary else (header, None)
    try:
        decoded = decode_request(body, length)
        checked = validate_inputs(decoded.inputs, SPECS, allow_nonfinite=False)
    except RequestError as exc:
        assert str(exc)
        return
    assert set(checked) == {"x", "ids"}


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), length=st.none() | st.text(max_size=6))
def test_fuzzed_bytes_raise_only_request_errors(body, length):
    try:
        decode_request(body, length)
    except RequestError:
        pass


# -- hostile families: each must be a RequestError (a 400), never anything else ---------------------

ALL_TYPES = sorted(DATATYPES)


def _deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


hostile = st.one_of(
    # BYTES whose data length does not match its shape (once a 500)
    st.builds(lambda n, shape: json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": shape,
                                                       "data": ["a"] * n}]}).encode(),
              st.integers(0, 6), st.lists(st.integers(0, 3), max_size=3)),
    # deep nesting anywhere: the body, a tensor's data, parameters
    st.builds(lambda d: _deep(d).encode(), st.integers(500, 200_000)),
    st.builds(lambda d: ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": ' + _deep(d) + "}]}").encode(),
              st.integers(500, 200_000)),
    st.builds(lambda d: ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}], '
                         '"parameters": {"p": ' + _deep(d) + "}}").encode(), st.integers(500, 200_000)),
    # oversized shapes
    st.builds(lambda shape, t: json.dumps({"inputs": [{"name": "x", "datatype": t, "shape": shape, "data": [1]}]}).encode(),
              st.lists(st.integers(2**20, 2**62), min_size=1, max_size=4), st.sampled_from(ALL_TYPES)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=hostile)
def test_hostile_json_families_are_request_errors(body):
    with pytest.raises(RequestError) as error:
        validate_inputs(decode_request(body, None).inputs, SPECS + [TensorSpec("s", "str", (None,))], False)
    assert "\n" not in str(error.value)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(datatype=st.sampled_from(ALL_TYPES), shape=st.lists(st.integers(0, 5), max_size=3),
       size=st.integers(-3, 200) | st.none(), blob=st.binary(max_size=160), header_shift=st.integers(-5, 300))
def test_binary_size_and_header_length_mismatches_are_request_errors(datatype, shape, size, blob, header_shift):
    """Every datatype with a binary_data_size that may disagree with its shape or the body, and an
    Inference-Header-Content-Length that may point anywhere, past the body included."""
    params = {} if size is None else {"binary_data_size": size}
    header = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "parameters": params}]}).encode()
    try:
        decoded = decode_request(header + blob, str(len(header) + header_shift))
    except RequestError as exc:
        assert "\n" not in str(exc)
        return
    # Accepted only when everything added up: the tensor holds exactly what its shape says.
    (array,) = decoded.inputs.values()
    assert list(array.shape) == shape


def test_a_refused_stream_message_keeps_its_id_without_parsing_a_huge_body(monkeypatch):
    """The stream answers each refusal with the request's id; a multi-MiB message is only searched near
    its start (a flood of them must not be parsed on the event loop), and a bool is no id."""
    from agent.serving import mqtt_stream
    from agent.serving.mqtt_stream import PEEK_PARSE_BYTES, _peek_id

    assert _peek_id(json.dumps({"id": "a-1", "inputs": []}).encode()) == "a-1"
    assert _peek_id(b'{"id": 7}') == 7 and _peek_id(b'{"id": true}') is None and _peek_id(b"{not json") is None
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(mqtt_stream.json, "loads", lambda data, *a, **k: parsed.append(len(data)) or real_loads(data, *a, **k))
    tail = b"0.5," * 2_000_000 + b"0.5]}]}"
    assert _peek_id(b'{"id": "big \\"one\\"", "inputs": [{"data": [' + tail) == 'big "one"'
    assert _peek_id(b'{"id": 12, "inputs": [{"data": [' + tail) == 12
    assert _peek_id(b'{"id": 1.5, "inputs": [{"data": [' + tail) is None  # not cut to 1
    assert _peek_id(b'{"inputs": [' + b"1," * 100_000 + b'1], "id": "late"}') is None  # past the first 4 KiB
    assert max(parsed) <= PEEK_PARSE_BYTES  # only the id itself was parsed, never the body
