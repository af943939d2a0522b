"""The local HTTP API: Open Inference Protocol v2 routes, ``/metrics``, bearer-token auth.

Starlette on uvicorn (uvloop + httptools): the ASGI stack FastAPI itself runs on, without FastAPI's
per-request pydantic validation, which would cost more than the model on large tensors. Tensors are
decoded straight into numpy (``orjson`` / ``np.frombuffer``), never into Python lists of floats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..config import AgentConfig
from .codec import BodyTooLarge, Codec
from .dataplane import ClientGone, Disconnected, InferenceService, ServiceError
from .front_door import OPEN_PATHS, PLACE, infer_path, token_matches
from .metrics import ServingMetrics
from . import model_info
from .oip import HEADER_LENGTH, RequestError
from .registry import ModelRegistry
from .shared_buffers import SharedBody
from .split import CLIENT_HEADER

log = logging.getLogger("edgepack.agent.serving")

def _json(data, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers=headers, media_type="application/json")


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


async def _chunks(receive):
    """The request body's chunks from ASGI ``receive`` (ClientDisconnect if the client goes first)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _read_body(receive, declared: int | None, limit: int, codec: Codec):
    """The raw body, refusing anything over ``limit`` bytes without reading it all. A large body of
    declared length goes straight into shared memory for the decoding helper (a SharedBody, which the
    caller releases); anything else comes back as bytes."""
    if declared is not None and declared > limit:
        raise BodyTooLarge
    if declared is not None and codec.offloads(declared):
        shared = SharedBody(declared)
        try:
            async for chunk in _chunks(receive):
                if not shared.write(chunk):
                    raise RequestError("the body is longer than its Content-Length")
                await asyncio.sleep(0)  # let requests that arrived meanwhile in between the chunks
        except BaseException:
            shared.release()
            raise
        return shared
    chunks, size = [], 0
    async for chunk in _chunks(receive):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one chunk: no copy


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive, queued):
    """Await the future ``queued``; if the client disconnects first, cancel it (its queued work is
    dropped) and raise Disconnected. One watcher task and a callback: no ``asyncio.wait`` per request."""
    queued = asyncio.ensure_future(queued)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    gone = []

    def disconnected(done) -> None:
        if not done.cancelled():
            gone.append(True)
            queued.cancel()

    watcher.add_done_callback(disconnected)
    try:
        return await queued
    except asyncio.CancelledError:
        if gone:
            raise Disconnected from None
        raise
    finally:
        watcher.remove_done_callback(disconnected)
        watcher.cancel()


async def _respond(send, status: int, body: bytes, headers: dict | None = None) -> None:
    raw = [(b"content-length", str(len(body)).encode())]
    if headers:
        raw += [(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class InferEndpoint:
    """ASGI endpoint of ``POST /v2/models/{name}[/versions/{v}]/infer``: the request straight into the
    dataplane and its answer straight out, without Starlette's Request and Response objects.

    :class:`InferRoute` calls it for every infer path before Starlette's router and middleware (py-spy
    put ~15% of the event loop's time per request there); Starlette routes the paths the parser leaves
    to it (percent-encoded ones) here too, so both take one code path."""

    def __init__(self, service: InferenceService):
        self.service = service

    async def __call__(self, scope, receive, send, target: tuple[str, str | None] | None = None) -> None:
        if target is None:
            params = scope["path_params"]
            target = params["name"], params.get("version")
        headers = {}
        for key, value in scope["headers"]:
            headers.setdefault(key, value)  # the first of repeated headers counts, as in Starlette
        declared = headers.get(b"content-length", b"")
        declared = int(declared) if declared.isdigit() else None
        header_length = headers.get(HEADER_LENGTH.encode())
        client = headers.get(CLIENT_HEADER.encode())
        service = self.service
        try:
            answer = await service.infer(
                target[0], target[1], lambda limit, codec: _read_body(receive, declared, limit, codec),
                encoding=headers.get(b"content-encoding", b"identity").decode("latin-1"),
                header_length=header_length.decode("latin-1") if header_length is not None else None,
                declared=declared, watch=lambda queued: _unless_disconnected(receive, queued),
                reserved=scope.pop(PLACE, None), client=client.decode("latin-1") if client is not None else None)
        except ServiceError as exc:
            if isinstance(exc, ClientGone):
                await _respond(send, 499, b"")
                return
            # A 503 before the body is read keeps the connection open: closing it on the unread body
            # would spare reading it, but clients would see a reset instead (benchmarks/overload.py).
            await _respond(send, exc.status, orjson.dumps({"error": exc.message}),
                           {"content-type": "application/json", **(exc.headers or {})})
            return
        await _respond(send, 200, answer.body, answer.headers)


class InferRoute:
    """ASGI: infer requests to :class:`InferEndpoint`, everything else to ``app`` (Starlette)."""

    def __init__(self, app, endpoint: InferEndpoint):
        self.app = app
        self.endpoint = endpoint

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            target = infer_path(scope.get("raw_path") or b"")
            if target is not None and target[0] and target[1] != "":
                await self.endpoint(scope, receive, send, target)
                return
        await self.app(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every path but the health probes needs ``Authorization: Bearer <token>``."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            if not token_matches(scope["headers"], self.expected):
                response = Response(b'{"error":"missing or wrong bearer token; send Authorization: Bearer <token>"}',
                                    401, media_type="application/json", headers={"www-authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(config: AgentConfig, registry: ModelRegistry, metrics: ServingMetrics, lifespan=None,
              service: InferenceService | None = None):
    """The ASGI application serving ``registry``'s models (``lifespan`` loads and closes them), a door of
    ``service`` (the daemon's dataplane; one of its own when not given). The app starts and stops the
    service's codec (its helper process)."""
    max_body = config.server.max_body_bytes

    service = service or InferenceService(config, registry, metrics, Codec(config.server.offload_bytes, max_body, config.server.decode_helpers))
    codec = service.codec

    def model_or_404(request: Request):
        try:
            return service.model(request.path_params["name"], request.path_params.get("version")), None
        except ServiceError as exc:
            return None, _error(exc.message, exc.status)

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        ok = registry.ready
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return _json(model_info.server_metadata(registry))

    async def repository_index(request: Request) -> Response:
        return _json(model_info.repository_index(registry))

    async def model_metadata(request: Request) -> Response:
        scheduler, error = model_or_404(request)
        return error or _json(model_info.model_metadata(scheduler))

    async def model_ready(request: Request) -> Response:
        scheduler, error = model_or_404(request)
        return error or _json({"name": scheduler.name, "ready": True})

    async def model_config(request: Request) -> Response:
        scheduler, error = model_or_404(request)
        return error or _json(model_info.model_config(scheduler))

    async def shadow(request: Request) -> Response:
        """edgepack's own: the shadow candidate's agreement, counts and latency (not part of OIP)."""
        try:
            return _json(service.shadow(request.path_params["name"]))
        except ServiceError as exc:
            return _json({"error": exc.message}, exc.status)

    async def statistics(request: Request) -> Response:
        name = request.path_params.get("name")
        try:
            return _json(service.statistics(name, request.path_params.get("version")))
        except ServiceError as exc:
            return _error(exc.message, exc.status)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), 200, headers={"content-type": metrics.content_type})

    infer = InferEndpoint(service)
    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/models/stats", statistics, methods=["GET"]),  # before {name}: "stats" is not a model
        Route("/v2/models/{name}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/config", model_config, methods=["GET"]),
        Route("/v2/models/{name}/stats", statistics, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/stats", statistics, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),  # percent-encoded paths (InferRoute)
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/shadow", shadow, methods=["GET"]),
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
    routed = InferRoute(app, infer)
    token = config.server.bearer_token()
    return BearerAuth(routed, token) if token else routed
