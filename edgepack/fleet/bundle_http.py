"""``edgepack fleet serve --http HOST:PORT``: the bundle shelf over HTTP with Range requests.

For small fleets and tests. At scale the same files go to an object store or a CDN (the shelf is
content-addressed: ``<sha256>.edgepack``, so ``aws s3 sync SHELF s3://bucket/edgepack/`` and
``--bundle-url https://cdn.example/edgepack/`` is all it takes) or nginx serves the folder; devices
check every chunk against the signed list, so the server needs no authentication of its own.

Only ``GET``/``HEAD /bundles/<sha256>.edgepack``; one range per request (``bytes=a-b``, ``a-`` or
``-n``; a multi-range request gets the whole file, as RFC 9110 allows); bodies go out with
``sendfile``. Standard library only: the controller's extra stays MQTT + SQLAlchemy.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edgepack.errors import UsageError

log = logging.getLogger("edgepack.fleet.http")

_PATH = re.compile(r"^/bundles/([0-9a-f]{64})\.edgepack$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """``(first, last)`` of a satisfiable single range; None for no (or an unsupported multi-) range:
    the whole file; False when unsatisfiable (416)."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match:
        return None
    start, end = match.groups()
    if not start and not end:
        return None
    if not start:  # the last N bytes
        count = int(end)
        if count == 0:
            return False
        return max(0, size - count), size - 1
    first = int(start)
    if end and int(end) < first:
        return None  # not a valid byte range (RFC 9110 14.1.1): the header is ignored, the whole file goes
    last = min(int(end), size - 1) if end else size - 1
    if first >= size:
        return False
    return first, last


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgepack-fleet"
    protocol_version = "HTTP/1.1"  # keep-alive: a device asks range after range on one connection

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.debug("http " + format, *args)

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self._serve(body=False)

    def do_GET(self):  # noqa: N802
        self._serve(body=True)

    def _refuse(self, status: int, message: str, extra: dict | None = None) -> None:
        payload = (message + "\n").encode()
        self.send_response(status)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _serve(self, body: bool) -> None:
        match = _PATH.match(self.path.split("?", 1)[0])
        if not match:
            self._refuse(404, "not found: bundles are at /bundles/<sha256>.edgepack")
            return
        path = self.server.shelf / f"{match.group(1)}.edgepack"
        try:
            handle = open(path, "rb")
        except OSError:
            self._refuse(404, f"no bundle {match.group(1)} on this controller")
            return
        with handle:
            size = os.fstat(handle.fileno()).st_size
            wanted = parse_range(self.headers.get("Range"), size)
            if wanted is False:
                self._refuse(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"})
                return
            first, last = wanted or (0, size - 1)
            self.send_response(206 if wanted else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{match.group(1)}"')
            self.send_header("Cache-Control", "public, max-age=31536000, immutable")  # content-addressed
            self.send_header("Content-Length", str(last - first + 1))
            if wanted:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            if body:
                self.wfile.flush()
                offset, left = first, last - first + 1
                while left > 0:
                    sent = os.sendfile(self.connection.fileno(), handle.fileno(), offset, min(left, 1 << 20))
                    if sent == 0:
                        # the file is shorter than it was (replaced while served): the answer is short of its
                        # Content-Length, so this connection cannot carry another one
                        self.close_connection = True
                        break
                    offset += sent
                    left -= sent
                self.server.bytes_sent += last - first + 1 - left


class BundleServer(ThreadingHTTPServer):
    """Serves ``shelf`` on ``(host, port)`` from daemon threads (one per connection)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, shelf: Path, host: str, port: int):
        self.shelf = Path(shelf)
        self.bytes_sent = 0
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise UsageError(f"--http {host}:{port}: cannot listen ({exc.strerror}); choose another port") from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL desired states name (``<url><sha256>.edgepack``)."""
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            import socket

            host = socket.getfqdn()  # listening everywhere: name this host (or give --bundle-url)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/bundles/"

    def start(self) -> "BundleServer":
        self._thread = threading.Thread(target=self.serve_forever, name="bundle-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def parse_listen(value: str, option: str = "--http") -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``, or ``PORT`` alone for 127.0.0.1)."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"{option} {value!r}: give HOST:PORT, e.g. 127.0.0.1:8080") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"{option} {value!r}: the port must be 0-65535")
    return host, number
