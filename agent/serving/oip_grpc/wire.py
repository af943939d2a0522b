"""``ModelInferRequest`` bytes -> checked feeds, and outputs -> ``ModelInferResponse`` bytes.

Tensors come as ``raw_input_contents`` (what tritonclient and KServe's clients send: numpy views of
the request's own bytes, cut out before protobuf parses the rest, no copy) or as typed ``contents``;
answers always go back as ``raw_output_contents``, as Triton sends them. The response is serialized
as its small header message followed by one length-delimited field per output: protobuf concatenates
repeated fields, so the tensors' bytes are copied once, into the answer, never through a message
object.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
from google.protobuf.message import DecodeError

from ..oip import DATATYPES, FROM_NUMPY, MAX_ELEMENTS, MAX_TIMEOUT_US, InferRequest, RequestError, _bytes_block, \
    _bytes_elements, validate_inputs
from ..split import client_of
from . import messages as pb

#: OIP datatype -> the InferTensorContents field holding it (FP16 has none: raw contents only)
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
#: raw_output_contents is field 6 of ModelInferResponse, length-delimited (wire type 2)
_RAW_OUTPUT_TAG = bytes([(6 << 3) | 2])
#: raw_input_contents is field 7 of ModelInferRequest
_RAW_INPUT_FIELD = 7
#: top-level fields the in-place scan reads at most (a request has its name, version, id, a few
#: parameters, and an input, a requested output and a raw block per tensor): past that, protobuf's
#: C parser takes the body, so a body of a million tiny fields costs what it costs protobuf
MAX_SCANNED_FIELDS = 256
#: the longest field tag protobuf accepts (a 32-bit varint)
_MAX_TAG_BYTES = 5


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    """A protobuf varint of ``data`` at ``at``: (value, the offset after it); ValueError when cut short."""
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def split_raw_inputs(body: bytes) -> tuple[bytes, list[memoryview]] | None:
    """``(the message without its raw_input_contents, those blocks as views of body)``, or None when
    the top-level fields do not scan, or are more than :data:`MAX_SCANNED_FIELDS` (protobuf's own
    parser then decides).

    protobuf hands a bytes field over as a new bytes object: for a 600 KB image that copy (fresh pages
    the kernel must fault in) cost more than parsing everything else, every request. The blocks are
    read in place instead; the rest is a few hundred bytes, parsed by protobuf as usual. Repeated
    fields keep their order when the message is cut this way, and any field may come anywhere.
    """
    blocks: list[memoryview] = []
    kept: list[memoryview] = []
    view = memoryview(body)
    at = start = fields = 0
    try:
        while at < len(body):
            fields += 1
            if fields > MAX_SCANNED_FIELDS:
                return None
            field_at = at
            key, at = read_varint(body, at)
            if at - field_at > _MAX_TAG_BYTES or key >> 3 == 0:
                return None  # protobuf refuses these tags: let it say so
            wire_type = key & 7
            if wire_type == 0:
                _, at = read_varint(body, at)
            elif wire_type == 1:
                at += 8
            elif wire_type == 5:
                at += 4
            elif wire_type == 2:
                length, at = read_varint(body, at)
                if key >> 3 == _RAW_INPUT_FIELD:
                    if at + length > len(body):
                        return None
                    kept.append(view[start:field_at])
                    blocks.append(view[at:at + length])
                    start = at + length
                at += length
            else:  # groups: not in this message's schema
                return None
            if at > len(body):
                return None
    except ValueError:
        return None
    if not blocks:
        return body, blocks
    kept.append(view[start:])
    return b"".join(kept), blocks


def _parameter(value):
    """The Python value of an InferParameter (None when unset)."""
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def _contents(tensor, datatype: str, dtype: np.dtype, count: int) -> np.ndarray:
    field = CONTENTS.get(datatype)
    if field is None:
        raise RequestError(f"input {tensor.name!r}: {datatype} tensors must come as raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise RequestError(f"input {tensor.name!r}: contents hold {len(values)} values but shape "
                           f"{list(tensor.shape)} needs {count}")
    if datatype == "BYTES":
        return np.asarray(list(values) + [None], dtype=object)[:-1]
    array = np.array(values, dtype=dtype)
    if datatype not in ("BOOL", "FP32", "FP64", "INT64", "UINT64") and len(array):
        # int_contents/uint_contents carry 8/16-bit values in 32 bits: refuse what does not fit.
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise RequestError(f"input {tensor.name!r}: a value does not fit {datatype}")
    return array


def decode_infer(body: bytes, target: tuple[str, str | None] | None = None) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """Parse a serialized ModelInferRequest into the request and its (unchecked) input arrays.
    ``target``: the model name and version the request was admitted for (read from its first bytes);
    a message that names another one (its fields repeated further on: protobuf's last one wins) is
    refused rather than run on the wrong model."""
    split = split_raw_inputs(body)
    try:
        if split is None:
            message = pb.ModelInferRequest.FromString(body)
            raw = message.raw_input_contents  # a block is copied out only when it is used
        else:
            rest, raw = split
            message = pb.ModelInferRequest.FromString(rest)
    except DecodeError:
        raise RequestError("the body is not a valid inference.ModelInferRequest") from None
    if target is not None and (message.model_name, message.model_version or None) != target:
        raise RequestError("model_name or model_version is given more than once with different values")
    if not message.inputs:
        raise RequestError("the request needs at least one input")
    if raw and len(raw) != len(message.inputs):
        raise RequestError(f"raw_input_contents holds {len(raw)} tensors for {len(message.inputs)} inputs: "
                           "give it for every input or for none")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if not name:
            raise RequestError(f"inputs[{index}] has no name")
        if name in inputs:
            raise RequestError(f"input {name!r} is given twice")
        datatype = tensor.datatype
        if datatype not in DATATYPES:
            raise RequestError(f"input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise RequestError(f"input {name!r}: shape {list(shape)} has a negative dimension")
        count = math.prod(shape)
        if count > MAX_ELEMENTS:
            raise RequestError(f"input {name!r}: shape {list(shape)} holds {count} elements, more than any request "
                               f"can carry ({MAX_ELEMENTS}); send fewer samples per request")
        dtype = DATATYPES[datatype]
        if raw:
            if tensor.HasField("contents"):
                raise RequestError(f"input {name!r} has both contents and raw_input_contents")
            block = raw[index]
            if datatype == "BYTES":
                array = _bytes_elements(memoryview(block), name, count)
            else:
                if len(block) != count * dtype.itemsize:
                    raise RequestError(f"input {name!r}: raw_input_contents holds {len(block)} bytes but shape "
                                       f"{list(shape)} of {datatype} needs {count * dtype.itemsize}")
                array = np.frombuffer(block, dtype=dtype)
        else:
            array = _contents(tensor, datatype, dtype, count)
        inputs[name] = array.reshape(shape)
    params = {key: _parameter(value) for key, value in message.parameters.items()}
    timeout_us = params.get("timeout")
    if timeout_us is not None and (not isinstance(timeout_us, int) or isinstance(timeout_us, bool)
                                   or not 0 <= timeout_us <= MAX_TIMEOUT_US):
        raise RequestError(f"parameters.timeout must be an integer from 0 to {MAX_TIMEOUT_US} (microseconds)")
    outputs = {}
    for item in message.outputs:
        if "classification" in item.parameters:
            raise RequestError("the classification extension is not supported; request the output tensor instead")
        outputs[item.name] = True
    return InferRequest(message.id or None, inputs, outputs, True, timeout_us, client_of(params, None)), inputs


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_infer(model_name: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray],
                 specs) -> bytes:
    """A serialized ModelInferResponse with every requested output as raw contents."""
    wanted = request.outputs or {spec.name: True for spec in specs}
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise RequestError(f"unknown output {unknown[0]!r}; the model gives {', '.join(s.name for s in specs)}")
    header = pb.ModelInferResponse(model_name=model_name, model_version=version, id=request.id or "")
    blobs = []
    for spec in specs:
        if spec.name not in wanted:
            continue
        array = outputs[spec.name]
        datatype = FROM_NUMPY.get(array.dtype.name, "BYTES")
        header.outputs.add(name=spec.name, datatype=datatype, shape=array.shape)
        blob = memoryview(_bytes_block(array)) if datatype == "BYTES" else \
            np.ascontiguousarray(array, array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8).data
        blobs += [_RAW_OUTPUT_TAG, _varint(blob.nbytes), blob]
    return b"".join([header.SerializeToString(), *blobs])


def decode_and_validate(body: bytes, specs, allow_nonfinite: bool, target=None):
    request, inputs = decode_infer(body, target)
    feeds = validate_inputs(inputs, specs, allow_nonfinite)
    request.inputs = {}
    return request, feeds


def _nothing() -> None:
    pass


class GrpcWire:
    """The dataplane's wire for gRPC bodies (see ``dataplane.OipWire``). A large body is parsed and
    checked on a worker thread: unlike JSON, that is C work (protobuf's parser of the body without its
    tensors, a scan of at most MAX_SCANNED_FIELDS fields, numpy's checks, which release the GIL), so
    the event loop keeps running beside it without a helper process."""

    __slots__ = ("target",)

    def __init__(self, name: str | None = None, version: str | None = None):
        self.target = None if name is None else (name, version)

    async def decode(self, codec, body: bytes, specs, allow_nonfinite: bool):
        if codec.offloads(len(body)):
            request, feeds = await asyncio.to_thread(decode_and_validate, body, specs, allow_nonfinite, self.target)
        else:
            request, feeds = decode_and_validate(body, specs, allow_nonfinite, self.target)
        return request, feeds, _nothing

    async def encode(self, codec, name: str, version: str, request, outputs, specs) -> tuple[bytes, dict]:
        size = sum(np.asarray(array).nbytes for array in outputs.values())
        if codec.offloads(size):
            return await asyncio.to_thread(encode_infer, name, version, request, outputs, specs), {}
        return encode_infer(name, version, request, outputs, specs), {}
