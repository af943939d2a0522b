"""Request decoding and response encoding, off the event loop when they are large.

Inflating, parsing and checking a large JSON body is CPU work that holds the GIL: orjson and the json
module never release it, so a worker *thread* would still stall every other request, health probes
included. Bodies over ``server.offload_bytes`` are therefore decoded (and large responses encoded) in
helper processes (``server.decode_helpers``, each started when a large body finds the others busy);
small ones are decoded inline, where a round trip to a helper would cost more than the work
(``benchmarks/overload.py`` measures the crossover).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from edgepack.tensors import TensorSpec

from .oip import InferRequest, RequestError, decode_request, encode_response, validate_inputs

from .shared_buffers import SharedBody, attach, map_arrays, pack_arrays, release


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
    new shared block (returned as its name and layout), or come back pickled when they hold objects.

    Every view of the block is gone before it is closed, also on errors (an exception's traceback
    would keep them alive, and the block's file descriptor with them), so errors are raised afresh."""
    shm = attach(name)  # the daemon's block: it unlinks it
    error = None
    view = shm.buf[:length]
    try:
        body = view if encoding.lower() == "identity" else bytes(view)
        request, feeds = decode_and_validate(body, encoding, header_length, specs, allow_nonfinite, limit)
        packed = pack_arrays(feeds)
        result = (request, None, packed) if packed else (request, {k: np.array(v) for k, v in feeds.items()}, None)
        del body, feeds
    except (RequestError, BodyTooLarge) as exc:
        error, result = type(exc)(*exc.args), None
    except Exception as exc:  # noqa: BLE001 - a bug: reported as such, without the views in its traceback
        error, result = RuntimeError(f"decoding failed: {type(exc).__name__}: {exc}"), None
    view.release()
    shm.close()
    if error is not None:
        raise error
    return result


def _lower_priority() -> None:
    """The helper does bulk work for one large request: the OS schedules the daemon's event loop and
    inference threads first (on a 2-core device, a helper at equal priority doubles every small
    request's latency while it parses). It also leaves when the daemon does."""
    try:
        os.nice(10)
    except OSError:
        pass
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A daemon killed with SIGKILL (the OOM killer, a watchdog) never shuts its pool down, and the helper
    # would wait on its call queue for ever: after a few crash-restarts a device holds a helper per crash.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def default_helpers() -> int:
    """Two decoding helpers, or one where the daemon may use a single core (a second would only take
    turns with the first)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 2 if cores >= 2 else 1


class Codec:
    """Decodes requests and encodes responses, inline when small, in a helper process when large."""

    def __init__(self, offload_bytes: int, max_body: int, helpers: int | None = None):
        self.offload_bytes = offload_bytes
        self.max_body = max_body
        self.helpers = helpers or default_helpers()
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the daemon has runtime threads, and a forked child would inherit their locks.
            # Python starts a pool's processes on demand: a second helper only when two large bodies overlap.
            self._pool = ProcessPoolExecutor(max_workers=self.helpers, mp_context=multiprocessing.get_context("spawn"),
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
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, function, *args)
        except BrokenProcessPool:
            # The helper died (killed, out of memory): the next request starts a new one (only this
            # pool is dropped; a late failure must not throw away a newer one).
            if self._pool is pool:
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
                     specs: list[TensorSpec]) -> tuple[bytes, dict[str, str]]:
        """The response body and headers; a large one is encoded in the helper (the bytes come back in
        one copy, made on the pool's result thread, not on the event loop)."""
        size = sum(np.asarray(array).nbytes for array in outputs.values())
        if self.offloads(size):
            return await self._call(encode_response, model_name, version, request, outputs, specs)
        return encode_response(model_name, version, request, outputs, specs)

    async def close(self) -> None:
        """Stop the helper and wait for the pool's manager thread to end (off the event loop).

        Not waiting leaves that thread closing its wake-up pipe while the interpreter's exit hook
        (``concurrent.futures.process._python_exit``) writes to it: on Python 3.11 that race prints
        "Exception ignored in: <module 'threading'>" on stderr at about one stop in a hundred.
        """
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, lambda: pool.shutdown(wait=True, cancel_futures=True))
