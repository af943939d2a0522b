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
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from edgepack.tensors import TensorSpec

from .oip import InferRequest, RequestError, decode_request, encode_response, validate_inputs

from .shared_buffers import SharedBody, attach, disown, map_arrays, pack_arrays, release


def _nothing() -> None:
    pass


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


def decode_shared(name: str, length: int, encoding: str, header_length: str | None, specs: list[TensorSpec],
                  allow_nonfinite: bool, limit: int):
    """In the helper: decode a body that lies in shared block ``name``; the checked feeds go into a
    new shared block (returned as its name and layout), or come back pickled when they hold objects."""
    shm = attach(name)  # the daemon's block: it unlinks it
    try:
        body = shm.buf[:length] if encoding.lower() == "identity" else bytes(shm.buf[:length])
        request, feeds = decode_and_validate(body, encoding, header_length, specs, allow_nonfinite, limit)
        packed = pack_arrays(feeds)
        if packed is None:
            feeds = {key: np.array(value, copy=True) for key, value in feeds.items()}  # off the block
        else:
            feeds = None
        del body
    finally:
        try:
            shm.close()
        except BufferError:  # an exception's traceback still maps it; collected with the traceback
            pass
    return (request, None, packed) if packed else (request, feeds, None)


def encode_shared(model_name: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray],
                  specs: list[TensorSpec]):
    """In the helper: encode a response into a new shared block; (its name, length, headers)."""
    payload, headers = encode_response(model_name, version, request, outputs, specs)
    shm = SharedMemory(create=True, size=max(1, len(payload)))
    try:
        shm.buf[:len(payload)] = payload
        disown(shm)
        return shm.name, len(payload), headers
    finally:
        shm.close()


def _lower_priority() -> None:
    """The helper does bulk work for one large request: the OS schedules the daemon's event loop and
    inference threads first (on a 2-core device, a helper at equal priority doubles every small
    request's latency while it parses)."""
    try:
        os.nice(10)
    except OSError:
        pass


class Codec:
    """Decodes requests and encodes responses, inline when small, in a helper process when large."""

    def __init__(self, offload_bytes: int, max_body: int):
        self.offload_bytes = offload_bytes
        self.max_body = max_body
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the daemon has runtime threads, and a forked child would inherit their locks.
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_lower_priority)
        return self._pool

    async def start(self) -> None:
        """Start the helper now: spawning it blocks the calling thread for tens of milliseconds, which
        must not happen on the event loop while the first large request waits."""
        if self.offload_bytes:
            await asyncio.get_running_loop().run_in_executor(None, lambda: self._executor().submit(int).result())

    def offloads(self, size: int) -> bool:
        return bool(self.offload_bytes) and size > self.offload_bytes

    async def _call(self, function, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor(), function, *args)
        except BrokenProcessPool:
            # The helper died (killed, out of memory): start a new one for the next request.
            self._pool = None
            raise RuntimeError("the decoding helper process died; retry the request") from None

    async def decode(self, body, encoding: str, header_length: str | None, specs: list[TensorSpec],
                     allow_nonfinite: bool) -> tuple[InferRequest, dict[str, np.ndarray], object]:
        """(request, checked feeds, release): ``body`` is bytes or a :class:`SharedBody`; call
        ``release()`` once the feeds are no longer used (it frees their shared memory, if any)."""
        if isinstance(body, SharedBody):
            request, feeds, packed = await self._call(decode_shared, body.name, body.filled, encoding, header_length,
                                                      specs, allow_nonfinite, self.max_body)
            if packed is None:
                return request, feeds, _nothing
            shm, feeds = map_arrays(*packed)
            return request, feeds, lambda: release(shm)
        args = (body, encoding, header_length, specs, allow_nonfinite, self.max_body)
        if self.offloads(len(body)):
            request, feeds = await self._call(decode_and_validate, *args)
        else:
            request, feeds = decode_and_validate(*args)
        return request, feeds, _nothing

    async def encode(self, model_name: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray],
                     specs: list[TensorSpec]):
        """(body, headers, release): a large body lies in shared memory (a memoryview the response
        sends from); call ``release()`` once it is sent."""
        size = sum(np.asarray(array).nbytes for array in outputs.values())
        if self.offloads(size):
            name, length, headers = await self._call(encode_shared, model_name, version, request, outputs, specs)
            shm = attach(name)
            return shm.buf[:length], headers, lambda: release(shm)
        payload, headers = encode_response(model_name, version, request, outputs, specs)
        return payload, headers, _nothing

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
