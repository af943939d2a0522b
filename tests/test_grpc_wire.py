"""The gRPC door's wire format, against tritonclient's own generated messages (a second, independent
compilation of the same protocol): the checked-in descriptor set, the model-name peek, request
decoding with its refusals, and raw response encoding."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor

from agent.serving.grpc_door import infer_target
from agent.serving.oip import InferRequest, RequestError
from agent.serving.oip_grpc import generate
from agent.serving.oip_grpc.wire import decode_infer, encode_infer, split_raw_inputs
from edgepack.tensors import TensorSpec


def test_the_checked_in_descriptor_set_is_the_compiled_proto():
    pytest.importorskip("grpc_tools")
    assert generate.render(generate.compile_proto()) == generate.OUTPUT.read_text(), \
        "inference.proto changed: run python -m agent.serving.oip_grpc.generate"


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=12), version=st.text(max_size=6), request_id=st.text(max_size=6),
       tensors=st.integers(0, 2), raw=st.binary(max_size=20))
def test_the_name_peek_agrees_with_a_full_parse(name, version, request_id, tensors, raw):
    request = service_pb2.ModelInferRequest(model_name=name, model_version=version, id=request_id)
    for index in range(tensors):
        request.inputs.add(name=f"t{index}", datatype="FP32", shape=[1, 2])
        request.raw_input_contents.append(raw)
    body = request.SerializeToString()
    assert infer_target(body) == (name, version or None)


def test_the_name_peek_reads_fields_in_any_order_and_survives_garbage():
    # field 2 before field 1 (legal protobuf, not what writers emit): still both
    assert infer_target(b"\x12\x011\x0a\x05model") == ("model", "1")
    assert infer_target(b"\x0a\x05mo") is None  # truncated
    assert infer_target(b"\xff\xff\xff") is None
    assert infer_target(b"{not json") is None


def _request(**tensors) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="m")
    for name, (datatype, shape, raw) in tensors.items():
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.tuples(st.text(max_size=6), st.lists(st.binary(max_size=40), max_size=3),
                                st.integers(0, 2), st.booleans()), min_size=1, max_size=3),
       garbage=st.binary(max_size=12))
def test_raw_inputs_are_cut_out_as_protobuf_would_read_them(parts, garbage):
    # Concatenated messages are one message to protobuf (repeated fields appended, the last scalar
    # wins): raw_input_contents interleaved with every other field, in any order.
    body = b""
    for request_id, blocks, tensors, with_parameter in parts:
        part = service_pb2.ModelInferRequest(id=request_id, model_name="m")
        for index in range(tensors):
            part.inputs.add(name=f"t{index}", datatype="UINT8", shape=[1])
        if with_parameter:
            part.parameters["timeout"].int64_param = 7
        part.raw_input_contents.extend(blocks)
        body += part.SerializeToString()
    expected = service_pb2.ModelInferRequest.FromString(body)
    rest, blocks = split_raw_inputs(body)
    assert [bytes(block) for block in blocks] == list(expected.raw_input_contents)
    parsed = service_pb2.ModelInferRequest.FromString(rest)
    expected.ClearField("raw_input_contents")
    assert parsed == expected
    # A body cut short or followed by garbage: the split agrees with protobuf, or hands it over.
    for broken in (body[:-1], body + garbage):
        _agrees_with_protobuf(broken)


def _agrees_with_protobuf(body: bytes) -> None:
    split = split_raw_inputs(body)
    try:
        whole = service_pb2.ModelInferRequest.FromString(body)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        whole = None
    if split is None:
        return  # protobuf's own parser decides
    try:
        rest = service_pb2.ModelInferRequest.FromString(split[0])
    except Exception:  # noqa: BLE001
        rest = None
    assert (whole is None) == (rest is None), "the split and protobuf disagree on whether the body is valid"
    if whole is not None:
        assert [bytes(block) for block in split[1]] == list(whole.raw_input_contents)


def test_the_split_refuses_what_protobuf_refuses_and_bounds_its_work():
    head = service_pb2.ModelInferRequest(model_name="m", inputs=[{"name": "x", "datatype": "UINT8", "shape": [2]}])
    body = head.SerializeToString()
    # field 7 with a 6-byte tag: a varint protobuf does not accept as a tag
    _agrees_with_protobuf(body + b"\xba\x80\x80\x80\x80\x00\x02ab")
    with pytest.raises(RequestError, match="not a valid"):
        decode_infer(body + b"\xba\x80\x80\x80\x80\x00\x02ab")
    _agrees_with_protobuf(body + b"\x02\x01a")  # field 0
    # A million empty raw blocks (2 MB): handed to protobuf after MAX_SCANNED_FIELDS, refused at once.
    flood = body + b"\x3a\x00" * 1_000_000
    assert split_raw_inputs(flood) is None
    started = time.perf_counter()
    with pytest.raises(RequestError, match="1000000 tensors for 1 inputs"):
        decode_infer(flood)
    assert time.perf_counter() - started < 0.5


def test_raw_inputs_are_views_of_the_request_not_copies():
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    values = np.arange(6, dtype=np.float32)
    request.raw_input_contents.append(values.tobytes())
    body = request.SerializeToString()
    _, inputs = decode_infer(body)
    np.testing.assert_array_equal(inputs["x"], values.reshape(2, 3))
    assert np.shares_memory(inputs["x"], np.frombuffer(body, np.uint8))


def test_raw_inputs_become_arrays_of_their_datatype():
    image = np.arange(6, dtype=np.float16).reshape(2, 3)
    words = b"".join(len(w).to_bytes(4, "little") + w for w in (b"hi", b"", b"there"))
    request = _request(a=("FP16", [2, 3], image.tobytes()), b=("BYTES", [3], words), c=("BOOL", [2], b"\x01\x00"))
    request.parameters["timeout"].int64_param = 5000
    request.outputs.add(name="y")
    decoded, inputs = decode_infer(request.SerializeToString())
    assert np.array_equal(inputs["a"], image) and inputs["a"].dtype == np.float16
    assert list(inputs["b"]) == [b"hi", b"", b"there"]
    assert inputs["c"].tolist() == [True, False]
    assert decoded.timeout_us == 5000 and decoded.outputs == {"y": True}


def test_typed_contents_are_accepted_and_checked():
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="INT8", shape=[3])
    tensor.contents.int_contents.extend([1, -2, 3])
    _, inputs = decode_infer(request.SerializeToString())
    assert inputs["x"].dtype == np.int8 and inputs["x"].tolist() == [1, -2, 3]
    tensor.contents.int_contents[0] = 300
    with pytest.raises(RequestError, match="does not fit INT8"):
        decode_infer(request.SerializeToString())


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.ClearField("inputs"), "at least one input"),
    (lambda r: r.raw_input_contents.append(b"x"), "holds 2 tensors for 1 inputs"),
    (lambda r: r.inputs[0].ClearField("name"), "has no name"),
    (lambda r: setattr(r.inputs[0], "datatype", "FP8"), "unknown datatype 'FP8'"),
    (lambda r: r.inputs[0].shape.__setitem__(0, -1), "negative dimension"),
    (lambda r: r.inputs[0].shape.extend([2**40, 2**40]), "more than any request"),
    (lambda r: r.raw_input_contents.__setitem__(0, b"short"), "needs 8"),
    (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "both contents and raw_input_contents"),
    (lambda r: r.parameters["timeout"].__setattr__("int64_param", -1), "parameters.timeout"),
    (lambda r: r.outputs.add(name="y").parameters["classification"].__setattr__("int64_param", 3), "classification"),
])
def test_hostile_requests_are_refused_with_what_is_wrong(mutate, message):
    request = _request(x=("FP32", [1, 2], np.zeros(2, np.float32).tobytes()))
    mutate(request)
    with pytest.raises(RequestError, match=message):
        decode_infer(request.SerializeToString())


def test_a_body_that_is_not_a_message_is_refused():
    with pytest.raises(RequestError, match="not a valid inference.ModelInferRequest"):
        decode_infer(b"\x0a\xff\xff\xff\xff\x0f")


def test_fp16_needs_raw_contents():
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP16", shape=[1])
    with pytest.raises(RequestError, match="FP16 tensors must come as raw_input_contents"):
        decode_infer(request.SerializeToString())


def test_responses_are_what_tritonclient_reads():
    outputs = {"scores": np.arange(6, dtype=np.float32).reshape(2, 3), "flags": np.array([True, False]),
               "half": np.array(1.5, dtype=np.float16), "words": np.array([b"a", "\u00e9t\u00e9"], dtype=object),
               "big": np.arange(3, dtype=">i4")}
    specs = [TensorSpec(name=n, dtype="float32", shape=[None]) for n in outputs]
    body = encode_infer("m", "2", InferRequest("id-1", {}), outputs, specs)
    response = service_pb2.ModelInferResponse.FromString(body)
    assert (response.model_name, response.model_version, response.id) == ("m", "2", "id-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("scores", "FP32", [2, 3]), ("flags", "BOOL", [2]), ("half", "FP16", []), ("words", "BYTES", [2]),
        ("big", "INT32", [3])]
    raw = response.raw_output_contents
    assert np.array_equal(np.frombuffer(raw[0], np.float32).reshape(2, 3), outputs["scores"])
    assert np.frombuffer(raw[1], np.bool_).tolist() == [True, False]
    assert np.frombuffer(raw[2], np.float16)[0] == 1.5
    assert list(deserialize_bytes_tensor(raw[3])) == [b"a", "\u00e9t\u00e9".encode()]
    assert np.frombuffer(raw[4], "<i4").tolist() == [0, 1, 2]  # little-endian on the wire, as OIP says
    only = encode_infer("m", "2", InferRequest(None, {}, {"flags": True}), outputs, specs)
    assert [o.name for o in service_pb2.ModelInferResponse.FromString(only).outputs] == ["flags"]
    with pytest.raises(RequestError, match="unknown output 'nope'"):
        encode_infer("m", "2", InferRequest(None, {}, {"nope": True}), outputs, specs)


def test_a_request_that_names_its_model_twice_is_refused():
    # protobuf keeps the last of a repeated field; the door admitted the request for the first name
    first = service_pb2.ModelInferRequest(model_name="a", model_version="1").SerializeToString()
    rest = _request(x=("FP32", [1, 2], np.zeros(2, np.float32).tobytes()))
    rest.model_name, rest.model_version = "b", "2"
    body = first + rest.SerializeToString()
    assert infer_target(body) == ("a", "1")
    with pytest.raises(RequestError, match="given more than once"):
        decode_infer(body, ("a", "1"))
    _, inputs = decode_infer(body, ("b", "2"))
    assert list(inputs) == ["x"]
