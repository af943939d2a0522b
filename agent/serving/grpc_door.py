"""The Open Inference Protocol v2 over gRPC (``server.grpc_port``): a door of the one dataplane.

The six OIP methods and the Triton methods ``tritonclient.grpc`` calls (model config, statistics,
the repository index, streaming inference), on ``grpc.aio`` in the daemon's event loop, so a request
reaches :class:`~agent.serving.dataplane.InferenceService` without a thread hop. The same bind
address, bearer token (as ``authorization: Bearer <token>`` metadata; the health methods are open,
as over HTTP) and TLS certificate as HTTP. Errors are the dataplane's classes with their gRPC code.

Infer bodies stay bytes until the dataplane has admitted them: the model name and version are read
from the message's first fields without parsing the tensors, so a refusal costs what HTTP's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

import grpc
from google.protobuf import json_format

from edgepack.errors import UsageError

from . import model_info
from .dataplane import BadRequest, ClientGone, InferenceService, ServiceError, Unavailable
from .oip_grpc import messages as pb
from .oip_grpc.wire import GrpcWire, read_varint
from .split import CLIENT_HEADER

log = logging.getLogger("edgepack.agent.grpc")
#: requests of one ModelStreamInfer stream in progress at once (the stream waits beyond it)
STREAM_IN_FLIGHT = 64


def infer_target(body: bytes) -> tuple[str, str | None] | None:
    """``(model_name, model_version or None)`` of a serialized ModelInferRequest, read from its leading
    fields (protobuf writers emit fields in number order: name is 1, version 2); any other layout is
    parsed in full. None: the body is not a ModelInferRequest."""
    found = {}
    at = 0
    try:
        while at < len(body) and len(found) < 2:
            tag, at = read_varint(body, at)
            if tag not in (0x0A, 0x12):  # fields 1 and 2, length-delimited
                break
            length, at = read_varint(body, at)
            if at + length > len(body):
                raise ValueError
            found[tag] = body[at:at + length].decode("utf-8")
            at += length
        if 0x0A not in found:
            raise ValueError
        return found[0x0A], found.get(0x12) or None
    except (ValueError, UnicodeDecodeError):
        try:
            message = pb.ModelInferRequest.FromString(body)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError, or anything its parser raises
            return None
        return message.model_name, message.model_version or None


def _stream_frame(field: int, payload: bytes) -> bytes:
    """One length-delimited field of a ModelStreamInferResponse (1: error_message, 2: infer_response)."""
    out, value = bytearray([(field << 3) | 2]), len(payload)
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out) + payload


def _tensor_metadata(entry: dict):
    tensor = pb.ModelMetadataResponse.TensorMetadata(name=entry["name"], datatype=entry["datatype"], shape=entry["shape"])
    for key, value in entry.get("parameters", {}).items():
        if isinstance(value, int):
            tensor.parameters[key].int64_param = value
        else:
            tensor.parameters[key].double_param = float(value)
    return tensor



def client_metadata(context) -> str | None:
    """The call's ``edgepack-client-id`` metadata (an A/B split routes by it)."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_HEADER and isinstance(value, str) and value:
            return value
    return None

class GrpcDoor:
    """The gRPC server of one daemon; ``await start()`` binds and serves, ``await stop()`` drains."""

    def __init__(self, config, registry, service: InferenceService):
        self.config = config
        self.registry = registry
        self.service = service
        token = config.server.bearer_token()
        self.expected = f"Bearer {token}".encode() if token else None
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._stopping: asyncio.Future | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind ``server.host:server.grpc_port`` and serve; the bound port comes back (0 picks one)."""
        server_config = self.config.server
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", server_config.max_body_bytes),
                ("grpc.max_send_message_length", -1),
                # gRPC sets SO_REUSEPORT by default: a second daemon on the same port would then share it
                # silently instead of failing to start.
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=server_config.limit_concurrency)
        self.server.add_generic_rpc_handlers((self._handlers(),))
        host = server_config.host
        address = f"[{host}]:{server_config.grpc_port}" if ":" in host else f"{host}:{server_config.grpc_port}"
        try:
            if server_config.tls_cert:
                credentials = grpc.ssl_server_credentials(
                    [(server_config.tls_key.read_bytes(), server_config.tls_cert.read_bytes())])
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if not self.port:
            self.server = None
            raise UsageError(f"cannot listen for gRPC on {address}; choose another server.grpc_port or stop the "
                             "process using it")
        await self.server.start()
        return self.port

    def begin_stop(self, grace: float) -> None:
        """Refuse new calls from now on; those in progress get ``grace`` seconds (see :meth:`stop`). Called
        when the daemon's shutdown starts, so gRPC drains alongside HTTP, not after it."""
        if self.server is not None and self._stopping is None:
            self._stopping = asyncio.ensure_future(self.server.stop(grace))

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let those in progress finish within ``grace`` seconds, then cancel them."""
        self.begin_stop(grace)
        if self._stopping is not None:
            await self._stopping
            self.server = None

    # -- plumbing ------------------------------------------------------------------------------------

    def _handlers(self):
        def unary(method, request_type, open_=False):
            async def handler(request, context):
                if not open_:
                    await self._authorize(context)
                return await method(request, context)
            return grpc.unary_unary_rpc_method_handler(handler, request_deserializer=request_type.FromString,
                                                       response_serializer=lambda message: message.SerializeToString())

        return grpc.method_handlers_generic_handler(pb.SERVICE, {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, open_=True),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest, open_=True),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest),
            "ModelConfig": unary(self.model_config, pb.ModelConfigRequest),
            "ModelStatistics": unary(self.model_statistics, pb.ModelStatisticsRequest),
            "RepositoryIndex": unary(self.repository_index, pb.RepositoryIndexRequest),
            # Infer bodies stay bytes (no deserializer): the dataplane admits them before decoding.
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.model_stream_infer),
        })

    async def _authorize(self, context) -> None:
        if self.expected is None:
            return
        given = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
        if not hmac.compare_digest(given, self.expected):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token; send metadata authorization: Bearer <token>")

    async def _fail(self, context, error: ServiceError):
        delay = self.config.server.refusal_delay_ms / 1000
        if isinstance(error, Unavailable) and delay:
            # as over HTTP: a client that calls again as soon as it is refused gets its refusals later
            queue = error.queue
            if queue is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.sleep(queue.hold_refusal(delay))
                finally:
                    queue.refusal_released()
        metadata = tuple((key, str(value)) for key, value in error.headers.items())
        await context.abort(grpc.StatusCode[error.grpc], error.message, metadata)

    def _model(self, name: str, version: str):
        return self.service.model(name, version or None)

    # -- health and metadata ---------------------------------------------------------------------------

    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        return pb.ServerReadyResponse(ready=self.registry.ready)

    async def model_ready(self, request, context):
        try:
            self._model(request.name, request.version)
        except ServiceError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, request, context):
        info = model_info.server_metadata(self.registry)
        return pb.ServerMetadataResponse(name=info["name"], version=info["version"], extensions=info["extensions"])

    async def model_metadata(self, request, context):
        try:
            info = model_info.model_metadata(self._model(request.name, request.version))
        except ServiceError as exc:
            return await self._fail(context, exc)
        return pb.ModelMetadataResponse(name=info["name"], versions=info["versions"], platform=info["platform"],
                                        inputs=[_tensor_metadata(t) for t in info["inputs"]],
                                        outputs=[_tensor_metadata(t) for t in info["outputs"]])

    async def model_config(self, request, context):
        try:
            info = model_info.model_config(self._model(request.name, request.version))
        except ServiceError as exc:
            return await self._fail(context, exc)
        return json_format.ParseDict({"config": info}, pb.ModelConfigResponse(), descriptor_pool=pb.POOL)

    async def model_statistics(self, request, context):
        try:
            report = self.service.statistics(request.name or None, request.version or None)
        except ServiceError as exc:
            return await self._fail(context, exc)
        return json_format.ParseDict(report, pb.ModelStatisticsResponse(), ignore_unknown_fields=True,
                                     descriptor_pool=pb.POOL)

    async def repository_index(self, request, context):
        index = model_info.repository_index(self.registry)
        if request.ready:
            index = [entry for entry in index if entry["state"] == "READY"]
        return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse(), descriptor_pool=pb.POOL)

    # -- inference -----------------------------------------------------------------------------------

    async def _infer(self, body: bytes, client: str | None = None) -> bytes:
        target = infer_target(body)
        if target is None:  # as HTTP answers a body that is not JSON: 400, whatever model it was for
            self.service.metrics.observe_request("_unknown", BadRequest.outcome)
            raise BadRequest("the body is not a valid inference.ModelInferRequest")
        name, version = target
        try:
            answer = await self.service.infer(name, version, body, declared=len(body), wire=GrpcWire(name, version),
                                              client=client)
        except asyncio.CancelledError:
            # the client cancelled the call (or went away): counted as HTTP counts a client that left
            self.service.metrics.observe_request(name if name in self.registry.schedulers else "_unknown",
                                                 ClientGone.outcome)
            raise
        return answer.body

    async def model_infer(self, body: bytes, context):
        await self._authorize(context)
        try:
            return await self._infer(body, client_metadata(context))
        except ServiceError as exc:
            await self._fail(context, exc)

    async def model_stream_infer(self, requests, context):
        """Triton's bidirectional stream: answers (or per-request errors, the stream goes on) in the
        order they are ready, at most STREAM_IN_FLIGHT requests of the stream at once."""
        await self._authorize(context)
        client = client_metadata(context)
        # Bounded both ways: a request holds its place until its answer is queued, and at most as many
        # answers wait for the client as requests may run, so a client that sends without reading its
        # answers stops being read (gRPC's flow control then holds its sender), it never fills memory.
        answers: asyncio.Queue = asyncio.Queue(STREAM_IN_FLIGHT)
        room = asyncio.Semaphore(STREAM_IN_FLIGHT)
        tasks: set[asyncio.Task] = set()

        async def one(body: bytes) -> None:
            try:
                try:
                    frame = _stream_frame(2, await self._infer(body, client))
                except ServiceError as exc:
                    frame = _stream_frame(1, f"[{exc.grpc}] {exc.message}".encode())
                await answers.put(frame)
            finally:
                room.release()

        async def read() -> None:
            try:
                async for body in requests:
                    await room.acquire()
                    task = asyncio.ensure_future(one(body))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
            finally:
                await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (frame := await answers.get()) is not None:
                yield frame
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
