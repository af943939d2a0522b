"""Open Inference Protocol v2 (KServe / Triton REST) request decoding and response encoding.

Covers JSON tensors and the binary tensor data extension: a request or response body may be a JSON
header of ``Inference-Header-Content-Length`` bytes followed by raw tensor bytes, one block per tensor
whose ``parameters.binary_data_size`` says how long it is. Every problem with a request raises
:class:`RequestError` with a message naming the tensor and what is wrong (the server answers 400).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import orjson

from edgepack.tensors import TensorSpec, all_finite
from .split import client_of

HEADER_LENGTH = "inference-header-content-length"
#: More elements than any body within server.max_body_bytes can describe (a BOOL is one byte).
MAX_ELEMENTS = 2**31
#: the longest request deadline accepted (a day, in microseconds)
MAX_TIMEOUT_US = 86_400_000_000

#: OIP datatype -> numpy dtype (little-endian, as the binary extension specifies).
DATATYPES = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
#: numpy dtype name (as in TensorSpec) -> OIP datatype.
FROM_NUMPY = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
              "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
              "float32": "FP32", "float64": "FP64", "str": "BYTES", "object": "BYTES"}
#: Triton model-config type names, for GET /v2/models/{name}/config.
CONFIG_TYPES = {name: "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}" for name in DATATYPES}


class RequestError(Exception):
    """A request the server refuses with 400 and this message."""


@dataclass
class InferRequest:
    """A decoded inference request."""

    id: str | None
    inputs: dict[str, np.ndarray]
    #: requested output name -> True when it must come back as binary data
    outputs: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False
    #: Triton's ``timeout`` request parameter: how long (microseconds) the request may wait in the queue
    timeout_us: int | None = None
    #: the ``client_id`` parameter (A/B splits route by it; agent.serving.split)
    client_id: str | None = None


def oip_datatype(spec: TensorSpec) -> str:
    return FROM_NUMPY.get(spec.dtype, spec.dtype.upper())


def oip_shape(shape) -> list[int]:
    return [-1 if dim is None else int(dim) for dim in shape]


def _loads(data: bytes) -> dict:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:  # NaN/Infinity are not JSON, but clients (Python's json) send them; the NaN policy decides
            value = json.loads(bytes(data))
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError("the request body nests too deeply") from None
    if not isinstance(value, dict):
        raise RequestError("the request body must be a JSON object with an 'inputs' list")
    return value


def _parameters(item: dict, where: str) -> dict:
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(f"{where}: 'parameters' must be an object")
    return params


def _shape(item: dict, name: str) -> tuple[int, ...]:
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    if len(shape) > 16:
        raise RequestError(f"input {name!r}: shape has {len(shape)} dimensions (at most 16)")
    return tuple(shape)


def _from_json_data(data, dtype: np.dtype, name: str, datatype: str, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(f"input {name!r}: 'data' must be a list of values")
    try:
        if datatype == "BYTES":
            flat = np.asarray(data, dtype=object).reshape(-1)
            if not all(isinstance(v, str) for v in flat):
                raise RequestError(f"input {name!r}: BYTES data must be strings")
            if flat.size != count:
                raise RequestError(f"input {name!r}: 'data' holds {flat.size} values but shape needs {count}")
            return flat
        if dtype.kind in "iub":
            raw = np.asarray(data)
            if raw.dtype.kind not in "iub" and raw.size:
                if raw.dtype.kind != "f" or not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
                    raise RequestError(f"input {name!r}: {datatype} data must be whole numbers")
            if raw.dtype.kind in "iu" and raw.size and dtype.kind in "iu":
                info = np.iinfo(dtype)
                if raw.min() < info.min or raw.max() > info.max:
                    raise RequestError(f"input {name!r}: a value does not fit in {datatype}")
            array = raw.astype(dtype)
        else:
            array = np.asarray(data, dtype=dtype)
    except RequestError:
        raise
    except (ValueError, TypeError, OverflowError):
        raise RequestError(f"input {name!r}: 'data' must be a flat or nested list of {datatype} values "
                           f"(row-major) matching its shape") from None
    if array.size != count:
        raise RequestError(f"input {name!r}: 'data' holds {array.size} values but shape needs {count}")
    return array.reshape(-1)


def _bytes_elements(block: memoryview, name: str, count: int) -> np.ndarray:
    """BYTES tensors in binary form: each element is a 4-byte little-endian length and its bytes."""
    values, offset = [], 0
    while offset < len(block):
        if offset + 4 > len(block):
            raise RequestError(f"input {name!r}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", block, offset)
        offset += 4
        if offset + length > len(block):
            raise RequestError(f"input {name!r}: a BYTES element runs past its binary_data_size")
        values.append(bytes(block[offset:offset + length]))
        offset += length
    if len(values) != count:
        raise RequestError(f"input {name!r}: binary data holds {len(values)} BYTES elements but shape needs {count}")
    return np.asarray(values + [None], dtype=object)[:-1]


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensors)."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise RequestError("Inference-Header-Content-Length must be an integer") from None
        if not 0 < length <= len(body):
            raise RequestError(f"Inference-Header-Content-Length {length} does not fit the {len(body)}-byte body")
        header, binary = _loads(body[:length]), memoryview(body)[length:]
    else:
        header, binary = _loads(body), memoryview(b"")
    inputs_json = header.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise RequestError("the request needs a non-empty 'inputs' list")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("'id' must be a string")
    params = _parameters(header, "request")
    if "classification" in params:
        raise RequestError("the classification extension is not supported; request the output tensor instead")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, item in enumerate(inputs_json):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(f"inputs[{index}] must be an object with a string 'name'")
        name = item["name"]
        if name in inputs:
            raise RequestError(f"input {name!r} is given twice")
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise RequestError(f"input {name!r}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}")
        dtype = DATATYPES[datatype]
        shape = _shape(item, name)
        count = math.prod(shape)
        if count > MAX_ELEMENTS:
            raise RequestError(f"input {name!r}: shape {list(shape)} holds {count} elements, more than any request "
                               f"body can carry ({MAX_ELEMENTS}); send fewer samples per request")
        size = _parameters(item, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise RequestError(f"input {name!r} has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RequestError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise RequestError(f"input {name!r}: binary_data_size {size} runs past the end of the body")
            block = binary[offset:offset + size]
            offset += size
            if datatype == "BYTES":
                array = _bytes_elements(block, name, count)
            else:
                if size != count * dtype.itemsize:
                    raise RequestError(f"input {name!r}: binary_data_size is {size} bytes but shape {list(shape)} "
                                       f"of {datatype} needs {count * dtype.itemsize}")
                array = np.frombuffer(block, dtype=dtype)
        elif "data" in item:
            array = _from_json_data(item["data"], dtype, name, datatype, count)
        else:
            raise RequestError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        inputs[name] = array.reshape(shape)
    if offset != len(binary):
        raise RequestError(f"the body holds {len(binary) - offset} bytes of binary data that no input claims")
    binary_default = bool(params.get("binary_data_output", False))
    timeout_us = params.get("timeout")
    if timeout_us is not None and (not isinstance(timeout_us, int) or isinstance(timeout_us, bool)
                                   or not 0 <= timeout_us <= MAX_TIMEOUT_US):
        raise RequestError(f"parameters.timeout must be an integer from 0 to {MAX_TIMEOUT_US} (microseconds)")
    outputs: dict[str, bool] = {}
    requested = header.get("outputs")
    if requested is not None:
        if not isinstance(requested, list):
            raise RequestError("'outputs' must be a list")
        for index, item in enumerate(requested):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise RequestError(f"outputs[{index}] must be an object with a string 'name'")
            out_params = _parameters(item, f"output {item['name']!r}")
            if "classification" in out_params:
                raise RequestError("the classification extension is not supported; request the output tensor instead")
            outputs[item["name"]] = bool(out_params.get("binary_data", binary_default))
    return InferRequest(request_id, inputs, outputs, binary_default, timeout_us, client_of(params, None))


def validate_inputs(inputs: dict[str, np.ndarray], specs: list[TensorSpec], allow_nonfinite: bool) -> dict[str, np.ndarray]:
    """Check names, datatypes, shapes (and NaN/Inf) against the model; return arrays in model dtype.
    A constant input may be left out here: the backend fills it from the bundle's default or says it
    is missing."""
    known = {spec.name: spec for spec in specs}
    unknown = [name for name in inputs if name not in known]
    if unknown:
        raise RequestError(f"unknown input {unknown[0]!r}; the model takes "
                           + ", ".join(f"{s.name} ({oip_datatype(s)} {oip_shape(s.shape)})" for s in specs))
    missing = [spec.name for spec in specs if spec.name not in inputs and spec.sample_axis is not None]
    if missing:
        raise RequestError(f"missing input {missing[0]!r} ({oip_datatype(known[missing[0]])} {oip_shape(known[missing[0]].shape)})")
    checked = {}
    batch = None
    for spec in specs:
        if spec.name not in inputs:
            continue  # a constant with a default
        array = inputs[spec.name]
        if not spec.shape and array.shape == (1,):
            array = array.reshape(())  # a scalar sent as shape [1] (many clients cannot send shape [])
        want = oip_datatype(spec)
        got = FROM_NUMPY.get(array.dtype.name, "BYTES" if array.dtype == object else array.dtype.name)
        if got != want:
            raise RequestError(f"input {spec.name!r}: datatype {got} does not match the model's {want}")
        problem = spec.check(array)
        if problem:
            raise RequestError(problem)
        if spec.batch_dynamic:
            count = spec.count(array)
            if batch is not None and count != batch:
                where = f" on axis {spec.sample_axis}" if spec.sample_axis else ""
                raise RequestError(f"input {spec.name!r}: batch size {count}{where} differs from the other inputs' {batch}")
            batch = count
        if not allow_nonfinite and array.dtype.kind == "f" and not all_finite(array):
            raise RequestError(f"input {spec.name!r} holds NaN or Inf values, which this model refuses")
        if want == "BYTES" and spec.dtype == "str":
            array = np.asarray([v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.reshape(-1)],
                               dtype=object).reshape(array.shape)
        checked[spec.name] = array
    if batch == 0:
        raise RequestError("the batch is empty (first dimension 0)")
    return checked


def _bytes_block(array: np.ndarray) -> bytes:
    parts = []
    for value in array.reshape(-1):
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def encode_response(model_name: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray],
                    specs: list[TensorSpec]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (binary outputs when requested)."""
    wanted = request.outputs or {spec.name: request.binary_default for spec in specs}
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise RequestError(f"unknown output {unknown[0]!r}; the model gives {', '.join(s.name for s in specs)}")
    entries, blobs = [], []
    for spec in specs:
        if spec.name not in wanted:
            continue
        array = outputs[spec.name]
        datatype = FROM_NUMPY.get(array.dtype.name, "BYTES")
        entry = {"name": spec.name, "datatype": datatype, "shape": list(array.shape)}
        if wanted[spec.name]:
            blob = _bytes_block(array) if datatype == "BYTES" else np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        entries.append(entry)
    header = {"model_name": model_name, "model_version": version, "outputs": entries}
    if request.id is not None:
        header["id"] = request.id
    body = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return body, {"content-type": "application/json"}
    return body + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "inference-header-content-length": str(len(body))}
