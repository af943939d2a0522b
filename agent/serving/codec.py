"""Request decoding and response encoding, off the event loop when they are large.

Inflating, parsing and checking a large JSON body is CPU work that holds the GIL: orjson and the json
module never release it, so a worker *thread* would still stall every other request, health probes
included. Bodies over ``server.offload_bytes`` are therefore decoded (and large responses encoded) in
one helper process, started on first use; small ones are decoded inline, where a round trip to the
helper would cost more than the work (``benchmarks/overload.py`` measures the crossover).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from edgepack.tensors import TensorSpec

from .oip import InferRequest, RequestError, decode_request, encode_response, validate_inputs


class BodyTooLarge(Exception):
    """The (inflated) body is over ``server.max_body_bytes``."""


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """The body after its Content-Encoding, never more than ``limit`` bytes (zip bombs)."""
    encoding = encoding.lower()
    if encoding in ("gzip", "deflate"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise RequestError(f"the body is not valid {encoding} data") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise BodyTooLarge
        return body
    if encoding != "identity":
        raise RequestError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    return body


def decode_and_validate(body: bytes, encoding: str, header_length: str | None, specs: list[TensorSpec],
                        allow_nonfinite: bool, limit: int) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """Inflate, parse and check one infer request against ``specs``; the request comes back without its
    raw inputs (the checked feeds replace them)."""
    request = decode_request(inflate(body, encoding, limit), header_length)
    feeds = validate_inputs(request.inputs, specs, allow_nonfinite)
    request.inputs = {}
    return request, feeds


class Codec:
    """Decodes requests and encodes responses, inline when small, in a helper process when large."""

    def __init__(self, offload_bytes: int, max_body: int):
        self.offload_bytes = offload_bytes
        self.max_body = max_body
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the daemon has runtime threads, and a forked child would inherit their locks.
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def offloads(self, size: int) -> bool:
        return bool(self.offload_bytes) and size > self.offload_bytes

    async def _call(self, function, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor(), function, *args)
        except BrokenProcessPool:
            # The helper died (killed, out of memory): start a new one for the next request.
            self._pool = None
            raise RuntimeError("the decoding helper process died; retry the request") from None

    async def decode(self, body: bytes, encoding: str, header_length: str | None, specs: list[TensorSpec],
                     allow_nonfinite: bool) -> tuple[InferRequest, dict[str, np.ndarray]]:
        args = (body, encoding, header_length, specs, allow_nonfinite, self.max_body)
        if self.offloads(len(body)):
            return await self._call(decode_and_validate, *args)
        return decode_and_validate(*args)

    async def encode(self, model_name: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray],
                     specs: list[TensorSpec]) -> tuple[bytes, dict[str, str]]:
        size = sum(np.asarray(array).nbytes for array in outputs.values())
        if self.offloads(size):
            return await self._call(encode_response, model_name, version, request, outputs, specs)
        return encode_response(model_name, version, request, outputs, specs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
