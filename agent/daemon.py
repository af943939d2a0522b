"""``edgepack-agent run``: load the models, serve them over HTTP (and gRPC), drain and exit 0 on SIGTERM.

Shutdown order on SIGTERM/SIGINT (uvicorn's graceful shutdown, bounded by
``server.graceful_shutdown_s``): stop accepting connections, let in-flight requests finish and send
their responses, then stop the store watcher, finish queued batches and close every session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from pathlib import Path

from edgepack.errors import EdgepackError, UsageError

from .config import AgentConfig

log = logging.getLogger("edgepack.agent")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or stop "
                         "the process using it") from None
    sock.set_inheritable(True)
    return sock


def serve(config: AgentConfig, bundles: list[Path] = ()) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the process exit code."""
    import uvicorn

    from .logs import setup_logging
    from .serving.app import build_app
    from .serving.codec import Codec
    from .serving.dataplane import InferenceService
    from .serving.front_door import build_front_door
    from .serving.metrics import ServingMetrics
    from .serving.protocol import guarded_protocol
    from .serving.registry import ModelRegistry

    setup_logging(config.log_level)
    # The event loop shares the GIL with the inference threads (they hold it between runtime calls). By
    # default a thread waiting for the GIL waits up to 5 ms before it is handed over, which every request
    # would pay while a large one computes; 0.5 ms keeps the loop responsive at a small switching cost.
    sys.setswitchinterval(config.server.switch_interval_ms / 1000)
    metrics = ServingMetrics()
    registry = ModelRegistry(config, metrics, bundles)
    # One dataplane for every door: HTTP (the app) and MQTT streams (the fleet link).
    service = InferenceService(config, registry, metrics,
                               Codec(config.server.offload_bytes, config.server.max_body_bytes,
                                     config.server.decode_helpers))
    startup_error: list[str] = []

    def reported_here(record: logging.LogRecord) -> bool:
        # A refused bundle at startup is a user error, reported below as one "error:" line; uvicorn
        # would also log it with a traceback.
        return not (startup_error and "Traceback" in record.getMessage())

    logging.getLogger("uvicorn.error").addFilter(reported_here)

    grpc_door = None
    if config.server.grpc_port is not None:
        try:
            from .serving.grpc_door import GrpcDoor
        except ImportError as exc:
            print(f"error: server.grpc_port needs the grpcio package ({exc}); install it with: "
                  "pip install grpcio", file=sys.stderr)
            return 1
        grpc_door = GrpcDoor(config, registry, service)
    grpc_port = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal grpc_port
        link = None
        try:
            await registry.start()
            if grpc_door is not None:
                grpc_port = await grpc_door.start()
            if config.mqtt:
                from .fleet.link import FleetLink

                link = FleetLink(config, registry, metrics, service)
                await link.start()
        except EdgepackError as exc:
            startup_error.append(exc.message)
            if grpc_door is not None:
                await grpc_door.stop(0)
            raise
        names = sorted(registry.schedulers)
        log.info("serving", extra={"models": names, "host": config.server.host, "port": port, "grpc_port": grpc_port,
                                    "store": str(registry.store.root), "tls": bool(config.server.tls_cert)})
        if not names:
            log.warning("no model to serve yet; install one with 'edgepack-agent install BUNDLE --store "
                        f"{registry.store.root}' and this daemon picks it up")
        yield
        if grpc_door is not None:
            # Its drain began with HTTP's, when the shutdown started (server.on_shutdown below).
            await grpc_door.stop(config.server.graceful_shutdown_s)
        if link:
            await link.close()
        await registry.close()
        log.info("stopped", extra={"models": names})

    sock = _bind(config.server.host, config.server.port)
    port = sock.getsockname()[1]
    from .runtime.onnx_backend import allow_spinning

    allow_spinning(config.server.intra_op_spinning, between_runs=False)  # before any model loads
    app = build_app(config, registry, metrics, lifespan, service)
    uv_config = uvicorn.Config(
        app, loop=_pick("uvloop", "uvloop", "asyncio"), http=guarded_protocol(config.server.header_timeout_s, build_front_door(config, registry, metrics),
                                                                     config.server.refusal_delay_ms / 1000),
        lifespan="on", access_log=False, log_config=None, server_header=False,
        # No client addresses are used (no access log, no per-client policy): spare every request the
        # X-Forwarded-For middleware.
        proxy_headers=False,
        timeout_graceful_shutdown=config.server.graceful_shutdown_s,
        ssl_certfile=str(config.server.tls_cert) if config.server.tls_cert else None,
        ssl_keyfile=str(config.server.tls_key) if config.server.tls_key else None,
        # Many clients at once keep their connections; the queue, not the socket backlog, holds work.
        backlog=2048, timeout_keep_alive=config.server.keep_alive_s,
        # Beyond this many connections + requests uvicorn answers 503 itself, before any app code runs.
        limit_concurrency=config.server.limit_concurrency,
    )
    server = _Server(uv_config)
    if grpc_door is not None:
        server.on_shutdown.append(lambda: grpc_door.begin_stop(config.server.graceful_shutdown_s))
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn exits with status 3 when startup fails; the reason is printed below
        if not startup_error:
            raise
    finally:
        sock.close()
    if startup_error:
        print(f"error: {startup_error[0]}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


def _pick(module: str, yes: str, no: str) -> str:
    try:
        __import__(module)
        return yes
    except ImportError:
        return no


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a handled SIGTERM ends in exit code 0.

        uvicorn re-raises the signal after its graceful shutdown, so the process would die *by* SIGTERM
        (status 143); a service manager should see a clean stop instead. ``on_shutdown`` callbacks run as
        the shutdown starts (the gRPC door stops taking calls while HTTP drains).
        """

        def __init__(self, config):
            super().__init__(config)
            self.on_shutdown: list = []

        async def shutdown(self, sockets=None):
            for callback in self.on_shutdown:
                callback()
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                if self._captured_signals:
                    log.info("shutdown complete", extra={"signals": list(map(int, self._captured_signals)), "pid": os.getpid()})
                self._captured_signals.clear()

    return Server


def _Server(config):  # noqa: N802 - a factory standing in for the class uvicorn is imported for
    return _server_class()(config)
