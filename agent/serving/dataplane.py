"""One inference dataplane behind every door (HTTP, gRPC, MQTT streams), as KServe's
``DataPlane`` sits behind its REST and gRPC servers.

:class:`InferenceService` owns what every door used to do for itself: finding the model (Triton's
wording when it is unknown), admission (a place in the model's queue, the byte budget of large
bodies), decoding through the codec (inline, or in the helper process for large bodies), the sample
rule, deadlines, submitting, encoding, the metrics and Triton statistics of the outcome, and every
release in one ``finally``. A door only reads its body and writes what comes back: an answer, or a
:class:`ServiceError` whose class says the HTTP status, the gRPC code and the metrics outcome, once,
in :data:`ERRORS`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from starlette.requests import ClientDisconnect

from edgepack.errors import DataError, EdgepackError

from .codec import BodyTooLarge, Codec
from .oip import RequestError
from .scheduler import DeadlineExceeded, Overloaded
from .shared_buffers import SharedBody
from .split import served_versions

log = logging.getLogger("edgepack.agent.serving")


class ServiceError(Exception):
    """A request's failure as every door reports it: ``status`` (HTTP), ``grpc`` (status code name),
    ``outcome`` (the ``edgepack_requests_total`` label), ``headers`` (e.g. Retry-After)."""

    status, grpc, outcome = 500, "INTERNAL", "error"

    def __init__(self, message: str, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ModelNotFound(ServiceError):
    status, grpc, outcome = 404, "NOT_FOUND", "not_found"


class BadRequest(ServiceError):
    status, grpc, outcome = 400, "INVALID_ARGUMENT", "bad_request"


class TooLarge(ServiceError):
    status, grpc, outcome = 413, "RESOURCE_EXHAUSTED", "too_large"


class BodyTimeout(ServiceError):
    status, grpc, outcome = 408, "DEADLINE_EXCEEDED", "body_timeout"


class Unavailable(ServiceError):
    status, grpc, outcome = 503, "UNAVAILABLE", "overloaded"
    #: the model's queue when it refused (a door that holds the refusal back asks it how long)
    queue = None


def _queue_full(exc: Overloaded) -> Unavailable:
    error = Unavailable(str(exc), {"retry-after": str(exc.retry_after)})
    error.queue = exc.scheduler
    return error


class DeadlinePassed(ServiceError):
    status, grpc, outcome = 504, "DEADLINE_EXCEEDED", "deadline_exceeded"


class ClientGone(ServiceError):
    status, grpc, outcome = 499, "CANCELLED", "disconnected"


class Internal(ServiceError):
    pass


class Disconnected(Exception):
    """The client closed the connection before its answer was ready (raised by a door's watcher)."""


class TooManySamples(Exception):
    """A request carries more samples than ``max_samples_per_request``."""


#: internal exception -> the service error every door reports for it (the first match wins)
ERRORS: list[tuple[type | tuple, Callable[[BaseException, "InferenceService"], ServiceError]]] = [
    (ServiceError, lambda exc, service: exc),
    (Overloaded, lambda exc, service: _queue_full(exc)),
    (DeadlineExceeded, lambda exc, service: DeadlinePassed(str(exc))),
    (BodyTooLarge, lambda exc, service: TooLarge(
        f"the request body is larger than server.max_body_bytes ({service.max_body} bytes)")),
    (TooManySamples, lambda exc, service: TooLarge(str(exc))),
    ((RequestError, DataError), lambda exc, service: BadRequest(str(exc))),
    ((ClientDisconnect, Disconnected), lambda exc, service: ClientGone("the client went away")),
    (EdgepackError, lambda exc, service: Internal(exc.message)),
]


def classify(exc: BaseException, service: "InferenceService") -> ServiceError:
    """The :class:`ServiceError` for ``exc`` (anything unknown: an internal error, logged)."""
    for kinds, make in ERRORS:
        if isinstance(exc, kinds):
            error = make(exc, service)
            if isinstance(error, Internal):
                log.error("inference failed", extra={"error": error.message})
            return error
    log.error("inference failed", exc_info=exc)
    return Internal(f"internal error: {type(exc).__name__}")


def _printable(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def unknown_model(name: str, version: str | None, known: list[str]) -> ModelNotFound:
    """Triton's wording (clients match on it), then what is served; control characters in the names
    are escaped (the message stays one line)."""
    name, version = _printable(name), _printable(version) if version is not None else None
    what = f"'{name}'" + (f" version {version}" if version is not None else "")
    return ModelNotFound(f"Request for unknown model: {what} is not found; served models: {', '.join(known) or 'none'}")


def count_samples(feeds: dict, model) -> int:
    """The sample rule, in one place: the size of the sample axis (each input's own; constants hold
    none) when the model takes batches, else one."""
    if not model.backend.batched:
        return 1
    try:
        return model.backend.count(feeds)
    except (DataError, KeyError, IndexError):
        return 1  # the feeds' check that follows says what is wrong


def fill_constants(feeds: dict, backend) -> dict:
    """``feeds`` with the constant inputs a request left out taken from the bundle's defaults; DataError
    naming the first one without a default."""
    filled = dict(feeds)
    for spec in backend.inputs:
        if spec.name not in filled:
            if spec.name not in backend.defaults:
                raise DataError(f"missing input {spec.name!r} ({spec.describe()}); this model has no default for it")
            filled[spec.name] = backend.defaults[spec.name]
    return filled


def default_large_budget() -> int:
    """Bytes of large bodies in progress at once by default: an eighth of the memory, 64 MiB to 1 GiB."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 2 * 1024 ** 3
    return int(min(1024 ** 3, max(64 * 1024 ** 2, memory // 8)))


async def _within(awaitable: Awaitable, seconds: float):
    """``await awaitable``, TimeoutError after ``seconds``; without a task per call where Python has
    ``asyncio.timeout`` (3.11)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


#: ``read(limit, codec) -> bytes | SharedBody``: a door's way to read its request body
BodyReader = Callable[[int, Codec], Awaitable["bytes | SharedBody"]]


class OipWire:
    """How a door's body becomes an infer request and the answer becomes bytes: the OIP REST form (JSON,
    or JSON + binary tensors), through the codec (inline or in its helper process). Other doors bring
    their own wire with the same two methods (gRPC: ``oip_grpc.wire.GrpcWire``)."""

    __slots__ = ("encoding", "header_length")

    def __init__(self, encoding: str = "identity", header_length: str | None = None):
        self.encoding = encoding
        self.header_length = header_length

    async def decode(self, codec: Codec, body, specs, allow_nonfinite: bool):
        """(request, checked feeds, release of the feeds' memory)."""
        return await codec.decode(body, self.encoding, self.header_length, specs, allow_nonfinite)

    async def encode(self, codec: Codec, name: str, version: str, request, outputs, specs) -> tuple[bytes, dict]:
        """(body, headers) of the answer."""
        return await codec.encode(name, version, request, outputs, specs)


@dataclass
class Answer:
    """An encoded response: body bytes and headers (``inference-header-content-length`` for binary)."""

    body: bytes
    headers: dict


class InferenceService:
    """The dataplane: ``await service.infer(...)`` gives an :class:`Answer` or raises ServiceError."""

    def __init__(self, config, registry, metrics, codec: Codec):
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.codec = codec
        self.max_body = config.server.max_body_bytes
        self.large_budget = config.server.large_body_budget_bytes or default_large_budget()
        self.large_bytes = 0  # declared bytes of large bodies in progress
        self.large_count = 0

    # -- models ------------------------------------------------------------------------------------

    def model(self, name: str, version: str | None = None):
        """The scheduler serving ``name`` (at ``version``, when given), else ModelNotFound."""
        scheduler = self.registry.get(name)
        if scheduler is None or (version is not None and version not in served_versions(scheduler)):
            return self._not_found(name, version)
        return scheduler

    def _not_found(self, name: str, version: str | None):
        known = sorted(n for n in self.registry.schedulers if self.registry.get(n))
        raise unknown_model(name, version, known)

    def statistics(self, name: str | None = None, version: str | None = None) -> dict:
        """Triton's statistics of one model version, of a model's served version, or of every model."""
        if name is None:
            pairs = [(n, v) for n in sorted(self.registry.schedulers) if self.registry.get(n)
                     for v in served_versions(self.registry.get(n))]
        else:
            scheduler = self.model(name, version)
            pairs = [(name, version)] if version is not None else [(name, v) for v in served_versions(scheduler)]
        return self.metrics.statistics.report(pairs)

    def shadow(self, name: str) -> dict:
        """The model's shadow candidate: how it compares with the active version so far (404 without one)."""
        scheduler = self.model(name)
        if scheduler.shadow is None:
            raise ModelNotFound(f"model '{_printable(name)}' has no shadow version (models.{_printable(name)}.shadow "
                                "in agent.yaml, or edgepack-agent run --shadow BUNDLE)")
        return {"model": name, **scheduler.shadow.summary()}

    # -- admission ---------------------------------------------------------------------------------

    def _admit_large(self, declared: int) -> bool:
        """Take ``declared`` bytes of the large-body budget; False when it would go over (a body larger
        than the whole budget passes alone, so it is never refused for good)."""
        limit = self.config.server.max_large_requests
        if limit is not None and self.large_count >= limit:
            return False
        if self.large_bytes and self.large_bytes + declared > self.large_budget:
            return False
        self.large_bytes += declared
        self.large_count += 1
        return True

    def _release_large(self, declared: int) -> None:
        self.large_bytes -= declared
        self.large_count -= 1

    # -- inference ---------------------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, body: bytes | BodyReader, *, encoding: str = "identity",
                    header_length: str | None = None, declared: int | None = None,
                    watch: Callable[[Awaitable], Awaitable] | None = None, wire=None, reserved=None,
                    client: str | None = None) -> Answer:
        """Run one OIP request. ``body``: the bytes, or a reader a door reads them with (after
        admission: a refused request's body is not read). ``declared``: the body's announced length
        (admission of large bodies). ``watch``: wraps the wait for the result (a door that can see its
        client leave cancels it). ``wire``: the body's form (default: OIP REST with ``encoding`` and
        ``header_length``). ``reserved``: ``(scheduler, place)`` already taken from the request head
        (the HTTP front door's), used instead of taking one here (given back whatever happens).
        ``client``: the door's client id (a header or metadata; an A/B split routes by it)."""
        wire = wire or OipWire(encoding, header_length)
        started = time.perf_counter()
        scheduler = self.registry.get(name)
        if reserved is not None and reserved[0] is not scheduler:
            reserved[0].unreserve(reserved[1])  # another scheduler's (the model was reloaded since)
            reserved = None
        if scheduler is None or (version is not None and version not in served_versions(scheduler)):
            if reserved is not None:
                scheduler.unreserve(reserved[1])
            self.metrics.observe_request(name if name in self.registry.schedulers else "_unknown", "not_found")
            self._not_found(name, version)
        if declared is None and isinstance(body, (bytes, bytearray, memoryview)):
            declared = len(body)
        large = declared is not None and self.codec.offloads(declared)
        place, served, shared, release_feeds, counted, mirrored = None, None, None, None, False, None
        try:
            # Shed load before reading the body: a full queue costs the client one round trip, no more.
            place = reserved[1] if reserved is not None else scheduler.reserve()
            if large:
                if not self._admit_large(declared):
                    raise Unavailable(f"{self.large_bytes} bytes of large requests are in progress "
                                      f"(server.large_body_budget_bytes: {self.large_budget}); retry later",
                                      {"retry-after": "1"})
                counted = True
            split = scheduler.split
            served = scheduler.pin(split.served if split and version is not None and version == split.version else None)
            if not isinstance(body, (bytes, bytearray, memoryview)):
                try:
                    body = await _within(body(self.max_body, self.codec), self.config.server.body_timeout_s)
                except (asyncio.TimeoutError, TimeoutError):
                    raise BodyTimeout(f"the request body did not arrive within server.body_timeout_s "
                                      f"({self.config.server.body_timeout_s} s)") from None
                if isinstance(body, SharedBody):
                    shared = body
            elif len(body) > self.max_body:
                raise BodyTooLarge
            options = scheduler.options
            decode_started = time.perf_counter()
            decoded, feeds, release_feeds = await wire.decode(
                self.codec, body, served.model.inputs, options.nonfinite_inputs == "allow")
            input_s = time.perf_counter() - decode_started
            backend = served.model.backend
            if backend.defaults or len(feeds) < len(backend.inputs):
                feeds = fill_constants(feeds, backend)
            if split is not None and version is None and split.takes(decoded.client_id or client):
                # The B version takes the same inputs (checked when it loaded): the check above holds.
                scheduler.unpin(served)
                served = None
                served = scheduler.pin(split.served)
            samples = count_samples(feeds, served.model)
            if samples > options.max_samples_per_request:
                raise TooManySamples(f"the request carries {samples} samples; this model takes at most "
                                     f"{options.max_samples_per_request} per request (max_samples_per_request): "
                                     "split it into several requests")
            limits = [options.deadline_ms / 1000 if options.deadline_ms else None,
                      decoded.timeout_us / 1e6 if decoded.timeout_us is not None else None]
            limits = [limit for limit in limits if limit is not None]
            deadline = started + min(limits) if limits else None
            shadow = scheduler.shadow
            if shadow is not None and served is scheduler.current and shadow.wants(samples):
                # Feeds in shared memory (a large body) are freed after the run: those are copied. The
                # others view the request's own bytes, which nothing writes to.
                mirrored = shadow, feeds if release_feeds is None else {k: np.array(v) for k, v in feeds.items()}
            # From here the scheduler owns the feeds and their memory: it frees it once no run reads them.
            handed, release_feeds = release_feeds, None
            held, place = place, None  # submit uses the place, whatever happens in it
            queued = scheduler.submit(feeds, served, deadline, handed, held)
            del feeds
            result = await (watch(queued) if watch else queued)
            encode_started = time.perf_counter()
            # Encoded with the specs and version of the model that computed the answer.
            payload, headers = await wire.encode(self.codec, name, result.version, decoded, result.outputs,
                                                 result.served.model.outputs)
            output_s = time.perf_counter() - encode_started
            if mirrored is not None and result.served is mirrored[0].active:
                # copies: a merged batch's outputs are slices that would keep the whole batch alive
                mirrored[0].offer(mirrored[1], {k: np.array(v) for k, v in result.outputs.items()})
                mirrored = None
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure becomes one ServiceError
            error = classify(exc, self)
            self.metrics.observe_request(name, error.outcome)
            if served is not None:
                self.metrics.statistics.request(name, served.version, False, time.perf_counter() - started)
            raise error from None
        finally:
            if mirrored is not None:  # the request failed: its claimed place in the shadow's queue goes back
                mirrored[0].abandon()
            if place is not None:
                scheduler.unreserve(place)
            if served is not None:
                scheduler.unpin(served)
            if counted:
                self._release_large(declared)
            if shared is not None:
                shared.release()
            if release_feeds is not None:
                release_feeds()
        total = time.perf_counter() - started
        if scheduler.split is not None:
            role = "b" if result.served is scheduler.split.served else "a"
            self.metrics.split_requests.labels(name, result.version, role).inc()
        self.metrics.observe_request(name, "ok", total, result.queue_seconds)
        self.metrics.statistics.request(name, result.version, True, total, result.queue_seconds, input_s,
                                        result.inference_seconds, output_s)
        return Answer(payload, headers)
