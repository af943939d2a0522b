"""The local HTTP API: Open Inference Protocol v2 routes, ``/metrics``, bearer-token auth.

Starlette on uvicorn (uvloop + httptools): the ASGI stack FastAPI itself runs on, without FastAPI's
per-request pydantic validation, which would cost more than the model on large tensors. Tensors are
decoded straight into numpy (``orjson`` / ``np.frombuffer``), never into Python lists of floats.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from edgepack import __version__
from edgepack.errors import DataError, EdgepackError

from ..config import AgentConfig
from .codec import BodyTooLarge, Codec
from .shared_buffers import SharedBody
from .metrics import ServingMetrics
from .oip import CONFIG_TYPES, HEADER_LENGTH, RequestError, oip_datatype, oip_shape
from .registry import ModelRegistry
from .scheduler import DeadlineExceeded, Overloaded

log = logging.getLogger("edgepack.agent.serving")

EXTENSIONS = ["binary_tensor_data", "model_configuration", "metrics"]
#: Paths open without a token: liveness/readiness probes reveal nothing about models or data.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def _json(data, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers=headers, media_type="application/json")


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


class Disconnected(Exception):
    """The client closed the connection before its answer was ready."""


class TooManySamples(Exception):
    """A request carries more samples than ``max_samples_per_request``."""


async def _read_body(request: Request, limit: int, codec: Codec):
    """The raw body, refusing anything over ``limit`` bytes without reading it all. A large body of
    declared length goes straight into shared memory for the decoding helper (a SharedBody, which the
    caller releases); anything else comes back as bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    if declared is not None and declared.isdigit() and codec.offloads(int(declared)):
        shared = SharedBody(int(declared))
        try:
            async for chunk in request.stream():
                if not shared.write(chunk):
                    raise RequestError("the body is longer than its Content-Length")
                await asyncio.sleep(0)  # let requests that arrived meanwhile in between the chunks
        except BaseException:
            shared.release()
            raise
        return shared
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable):
    """Await ``awaitable``; if the client disconnects first, cancel it (its queued work is dropped)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise Disconnected


class BearerAuth:
    """ASGI middleware: every path but the health probes needs ``Authorization: Bearer <token>``."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no token prefix oracle
                response = Response(b'{"error":"missing or wrong bearer token; send Authorization: Bearer <token>"}',
                                    401, media_type="application/json", headers={"www-authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _tensor_metadata(spec) -> dict:
    entry = {"name": spec.name, "datatype": oip_datatype(spec), "shape": oip_shape(spec.shape)}
    if spec.quantization and spec.dtype.startswith(("int", "uint")):
        # Raw integer I/O (integer_io): callers need the affine mapping real = (q - zero_point) * scale.
        entry["parameters"] = {"scale": spec.quantization["scale"], "zero_point": spec.quantization["zero_point"]}
    return entry


def build_front_door(config: AgentConfig, registry: ModelRegistry, metrics: ServingMetrics):
    """Answers given from the request head alone, without the ASGI application (see
    ``agent.serving.protocol``): the health probes, and 503 for an inference request to a model whose
    queue is full. Under a flood those are most requests; this keeps their cost a small fraction of an
    accepted request's, so refusing never starves the accepted work or the probes. Anything else,
    including a request whose bearer token is wrong (401 from the application), passes on."""
    token = config.server.bearer_token()
    expected = f"Bearer {token}".encode() if token else None
    json_type = [(b"content-type", b"application/json")]

    def front_door(method: bytes, path: bytes, headers: list):
        if method == b"GET":
            if path == b"/v2/health/live":
                return 200, json_type, b'{"live":true}'
            if path == b"/v2/health/ready":
                ok = registry.ready
                return (200 if ok else 503), json_type, b'{"ready":true}' if ok else b'{"ready":false}'
            return None
        if method != b"POST" or not path.startswith(b"/v2/models/") or not path.endswith(b"/infer"):
            return None
        parts = path.split(b"/")  # b"", b"v2", b"models", NAME, [b"versions", VERSION,] b"infer"
        if len(parts) == 5:
            version = None
        elif len(parts) == 7 and parts[4] == b"versions":
            version = parts[5]
        else:
            return None
        if b"%" in path:
            return None  # percent-encoded names: the application decodes and routes them
        scheduler = registry.get(parts[3].decode("latin-1"))
        if scheduler is None or (version is not None and version.decode("latin-1") != scheduler.current.version):
            return None  # 404 from the application
        if expected is not None:
            # The last one, as the application's BearerAuth reads them (a dict of the headers).
            given = next((value for name, value in reversed(headers) if name == b"authorization"), b"")
            if not hmac.compare_digest(given, expected):
                return None  # 401 from the application; the queue's state is not for strangers
        try:
            scheduler.check_capacity()
        except Overloaded as exc:
            metrics.observe_request(scheduler.name, "overloaded")
            return 503, [*json_type, (b"retry-after", str(exc.retry_after).encode())], orjson.dumps({"error": str(exc)})
        return None

    return front_door


def build_app(config: AgentConfig, registry: ModelRegistry, metrics: ServingMetrics, lifespan=None):
    """The ASGI application serving ``registry``'s models (``lifespan`` loads and closes them)."""
    max_body = config.server.max_body_bytes

    def model_or_404(request: Request):
        name = request.path_params["name"]
        scheduler = registry.get(name)
        if scheduler is None:
            known = ", ".join(sorted(registry.schedulers)) or "none"
            return None, _error(f"unknown model {name!r}; served models: {known}", 404)
        version = request.path_params.get("version")
        if version is not None and version != scheduler.current.version:
            return None, _error(f"model {name!r} serves version {scheduler.current.version}, not {version!r}", 404)
        return scheduler, None

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        ok = registry.ready
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return _json({"name": "edgepack-agent", "version": __version__, "extensions": EXTENSIONS,
                      "models": sorted(name for name in registry.schedulers if registry.get(name))})

    async def repository_index(request: Request) -> Response:
        # Triton's model repository extension, as tritonclient's get_model_repository_index() reads it.
        index = []
        for name in sorted(registry.schedulers):
            scheduler = registry.get(name)
            entry = {"name": name, "state": "READY" if scheduler else "UNAVAILABLE"}
            if scheduler:
                entry["version"] = scheduler.current.version
            else:
                entry["reason"] = "no version loaded (see the agent log)"
            index.append(entry)
        return _json(index)

    async def model_metadata(request: Request) -> Response:
        scheduler, error = model_or_404(request)
        if error:
            return error
        model = scheduler.current.model
        return _json({
            "name": scheduler.name, "versions": [model.version],
            "platform": "onnxruntime_onnx" if model.backend.runtime == "onnxruntime" else "tensorflow_lite",
            "inputs": [_tensor_metadata(s) for s in model.inputs],
            "outputs": [_tensor_metadata(s) for s in model.outputs],
        })

    async def model_ready(request: Request) -> Response:
        scheduler, error = model_or_404(request)
        if error:
            return error
        return _json({"name": scheduler.name, "ready": True})

    async def model_config(request: Request) -> Response:
        scheduler, error = model_or_404(request)
        if error:
            return error
        model = scheduler.current.model

        def tensors(specs):
            # Triton's config leaves the batch dimension out when max_batch_size > 0.
            batched = scheduler.max_batch > 1
            return [{"name": s.name, "data_type": CONFIG_TYPES[oip_datatype(s)],
                     "dims": oip_shape(s.shape[1:] if batched else s.shape)} for s in specs]

        body = {"name": scheduler.name, "platform": "onnxruntime_onnx" if model.backend.runtime == "onnxruntime"
                else "tensorflow_lite", "max_batch_size": scheduler.max_batch if scheduler.max_batch > 1 else 0,
                "input": tensors(model.inputs), "output": tensors(model.outputs),
                "instance_group": [{"count": scheduler.options.instances, "kind": "KIND_CPU"}]}
        if scheduler.max_batch > 1:
            body["dynamic_batching"] = {"max_queue_delay_microseconds": int(scheduler.options.batching.max_queue_delay_ms * 1000),
                                        "default_queue_policy": {"max_queue_size": scheduler.max_queue}}
        # Why requests are (not) merged: a fixed batch of the model file, outputs that depend on the batch.
        body["parameters"] = {
            "model_batch": {"string_value": str(model.batch_size) if model.batch_size else "dynamic"},
            "batch_invariant": {"string_value": "true" if model.batch_invariant else "false"},
            "max_queue_size": {"string_value": str(scheduler.max_queue)},
            "max_samples_per_request": {"string_value": str(scheduler.options.max_samples_per_request)},
        }
        return _json(body)

    codec = Codec(config.server.offload_bytes, max_body)
    large = {"in_flight": 0}

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["name"]
        scheduler, error = model_or_404(request)
        if error:
            metrics.observe_request(name if name in registry.schedulers else "_unknown", "not_found")
            return error
        options = scheduler.options
        declared = request.headers.get("content-length", "")
        is_large = codec.offloads(int(declared)) if declared.isdigit() else False
        try:
            # Shed load before reading the body: a full queue costs the client one round trip, no more.
            # (Usually the front door has answered already; this is the race with a queue filling since.)
            place = scheduler.reserve()
        except Overloaded as exc:
            metrics.observe_request(name, "overloaded")
            # The connection stays open: closing it on the unread body would spare the server reading it,
            # but clients would see a reset instead of this 503 (tried in benchmarks/overload.py).
            return _json({"error": str(exc)}, 503, {"retry-after": str(exc.retry_after)})
        if is_large and large["in_flight"] >= config.server.max_large_requests:
            scheduler.unreserve(place)
            metrics.observe_request(name, "overloaded")
            return _json({"error": f"{large['in_flight']} large requests are in progress "
                          f"(server.max_large_requests); retry later"}, 503, {"retry-after": "1"})
        large["in_flight"] += is_large
        body, release_feeds, served = None, None, None
        try:
            served = scheduler.pin()
            body = await asyncio.wait_for(_read_body(request, max_body, codec), config.server.body_timeout_s)
            decoded, feeds, release_feeds = await codec.decode(
                body, request.headers.get("content-encoding", "identity"), request.headers.get(HEADER_LENGTH),
                served.model.inputs, options.nonfinite_inputs == "allow")
            first = next(iter(feeds.values()))
            samples = len(first) if first.ndim and served.model.backend.batched else 1
            if samples > options.max_samples_per_request:
                raise TooManySamples(f"the request carries {samples} samples; this model takes at most "
                                     f"{options.max_samples_per_request} per request (max_samples_per_request): "
                                     "split it into several requests")
            limits = [options.deadline_ms / 1000 if options.deadline_ms else None,
                      decoded.timeout_us / 1e6 if decoded.timeout_us is not None else None]
            limits = [limit for limit in limits if limit is not None]
            deadline = started + min(limits) if limits else None
            # From here the scheduler owns the feeds and their memory: it frees it once no run reads them.
            handed, release_feeds = release_feeds, None
            place, held = None, place  # submit uses the place, whatever happens in it
            queued = scheduler.submit(feeds, served, deadline, handed, held)
            del feeds, first
            result = await _unless_disconnected(request, queued)
            # Encoded with the specs and version of the model that computed the answer.
            payload, headers = await codec.encode(name, result.version, decoded, result.outputs,
                                                  result.served.model.outputs)
        except Overloaded as exc:
            metrics.observe_request(name, "overloaded")
            return _json({"error": str(exc)}, 503, {"retry-after": str(exc.retry_after)})
        except DeadlineExceeded as exc:
            metrics.observe_request(name, "deadline_exceeded")
            return _error(str(exc), 504)
        except asyncio.TimeoutError:
            metrics.observe_request(name, "body_timeout")
            return _error(f"the request body did not arrive within server.body_timeout_s "
                          f"({config.server.body_timeout_s} s)", 408)
        except BodyTooLarge:
            metrics.observe_request(name, "too_large")
            return _error(f"the request body is larger than server.max_body_bytes ({max_body} bytes)", 413)
        except TooManySamples as exc:
            metrics.observe_request(name, "too_large")
            return _error(str(exc), 413)
        except (RequestError, DataError) as exc:
            metrics.observe_request(name, "bad_request")
            return _error(str(exc), 400)
        except (ClientDisconnect, Disconnected):
            metrics.observe_request(name, "disconnected")
            return Response(status_code=499)
        except EdgepackError as exc:
            metrics.observe_request(name, "error")
            log.error("inference failed", extra={"model": name, "error": exc.message})
            return _error(exc.message, 500)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request, never the daemon
            metrics.observe_request(name, "error")
            log.exception("inference failed", extra={"model": name})
            return _error(f"internal error: {type(exc).__name__}", 500)
        finally:
            if place is not None:
                scheduler.unreserve(place)
            if served is not None:
                scheduler.unpin(served)
            large["in_flight"] -= is_large
            if isinstance(body, SharedBody):
                body.release()
            if release_feeds is not None:
                release_feeds()
        metrics.observe_request(name, "ok", time.perf_counter() - started, result.queue_seconds)
        return Response(payload, 200, headers=headers)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), 200, headers={"content-type": metrics.content_type})

    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/models/{name}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/config", model_config, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]

    async def not_found(request: Request, exc) -> Response:
        return _error(f"no route {request.method} {request.url.path}; see the Open Inference Protocol v2 paths", exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan_and_codec(app):
        try:
            await codec.start()
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield
        finally:
            await codec.close()

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan_and_codec)
    token = config.server.bearer_token()
    return BearerAuth(app, token) if token else app
