"""``edgepack fleet serve --dashboard HOST:PORT``: the fleet's live page and its JSON API.

Read-only without the token: the page, its scripts and ``GET /api/*`` need nothing (bind it to a
trusted address, as the default loopback one is); actions (``POST /api/rollouts/{id}/{action}``:
pause, resume, abort, rollback) need ``Authorization: Bearer TOKEN``. The token travels in a header,
never a cookie, so another site's page cannot act through a logged-in browser.

One poller thread reads the registry every ``interval`` seconds (SQLite or PostgreSQL alike) and
keeps the latest snapshot; each server-sent-events client gets it, filtered its own way, when it
changed, so ten open pages cost the database what one does. Every script and style is served from
this package (uPlot vendored with its licence) and the Content-Security-Policy forbids anything
else: the page works offline and makes no request that leaves the controller.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from edgepack.errors import EdgepackError, UsageError

from . import views

log = logging.getLogger("edgepack.fleet.dashboard")

STATIC = Path(__file__).with_name("static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
#: the files the page may load: nothing else under the package is served
_FILES = {"/": "index.html", "/index.html": "index.html", "/static/dashboard.js": "dashboard.js",
          "/static/dashboard.css": "dashboard.css", "/static/uPlot.iife.min.js": "uPlot.iife.min.js",
          "/static/uPlot.min.css": "uPlot.min.css", "/static/uPlot.LICENSE": "uPlot.LICENSE",
          "/favicon.ico": None}
_ACTION = re.compile(r"^/api/rollouts/(\d+)/(pause|resume|abort|rollback)$")
_SECURITY = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: open event streams at once (each holds a thread); more get a 503 and the page retries
MAX_STREAMS = 32
KEEPALIVE_S = 15.0


#: the most of one core the poller may take: a snapshot that costs more is taken less often
MAX_SHARE = 0.1
#: the per-minute series change once a minute: read again this often (or less, as for MAX_SHARE)
SERIES_EVERY_S = 15.0
SERIES_SHARE = 0.05


def plan(devices_s: float, series_s: float, interval: float = 1.0) -> tuple[float, float]:
    """(seconds between snapshots, seconds between series reads) for snapshots whose device and
    rollout part takes ``devices_s`` and whose series take ``series_s``."""
    return max(interval, devices_s / MAX_SHARE), max(SERIES_EVERY_S, series_s / SERIES_SHARE)


class Snapshots:
    """The latest registry snapshot, refreshed by one thread; streams wait for the next version.

    Devices and rollouts are read every ``interval`` seconds, the per-minute series every 15 s; both
    less often when they cost more, so the dashboard never takes more than about 15% of a core from
    the controller's ingestion and ticks, whatever the size of the fleet (benchmarks/dashboard.py)."""

    def __init__(self, registry, interval: float = 1.0, window_s: float = 3600.0):
        self.registry, self.interval, self.window_s = registry, interval, window_s
        self.version = 0
        self.latest: dict | None = None
        self.latest_text = "{}"
        self._digest = None
        self._series: dict | None = None
        self._series_at = 0.0
        self._costs = (0.0, 0.0)  # devices + rollouts, series (seconds)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-poller", daemon=True)

    def start(self) -> "Snapshots":
        self.refresh()
        self._thread.start()
        return self

    def _read(self) -> dict:
        began = time.perf_counter()
        series_cost, read_series = self._costs[1], 0.0
        if self._series is None or time.monotonic() - self._series_at >= plan(*self._costs, self.interval)[1]:
            self._series = views.series_view(self.registry, self.window_s)
            self._series_at = time.monotonic()
            series_cost = read_series = time.perf_counter() - began
        made = {"devices": views.devices_view(self.registry), "rollouts": views.rollouts_view(self.registry),
                "series": self._series, "error": None}
        self._costs = (time.perf_counter() - began - read_series, series_cost)
        return made

    def refresh(self) -> None:
        """Read the registry once; a new version when anything but the clock changed."""
        try:
            made = self._read()
        except Exception as exc:  # noqa: BLE001 - a database hiccup must not stop the page: it says so
            log.warning("dashboard: reading the registry failed: %s", exc)
            # what the page says (anyone may read it): no driver text, which can name hosts and users
            made = {k: v for k, v in (self.latest or {}).items() if k != "time"}
            made["error"] = f"reading the registry failed ({type(exc).__name__}); see the controller's log"
        digest = json.dumps(made, default=str, separators=(",", ":"))
        with self._changed:
            if digest != self._digest:
                self._digest = digest
                self.latest = {**made, "time": time.time()}
                # the unfiltered stream's data, encoded once per version for every page that shows it all
                self.latest_text = f'{digest[:-1]},"time":{self.latest["time"]}}}'
                self.version += 1
                self._changed.notify_all()

    def _run(self) -> None:
        while not self._stop.wait(plan(*self._costs, self.interval)[0]):
            self.refresh()

    def wait(self, seen: int, timeout: float) -> tuple[int, dict | None]:
        """The version after ``seen`` once there is one (or ``seen`` and None after ``timeout``)."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != seen or self._stop.is_set(), timeout)
            if self.version == seen:
                return seen, None
            return self.version, self.latest

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout=5)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


def filtered(snapshot: dict, filters: dict) -> dict:
    """``snapshot`` with only the devices passing ``filters`` (the counts and choices stay the fleet's)."""
    if not any(filters.values()):
        return snapshot
    fleet = snapshot.get("devices") or {}
    shown = [d for d in fleet.get("devices", []) if views.matches(d, filters)]
    return {**snapshot, "devices": {**fleet, "devices": shown, "shown": len(shown)}}


def _filters(query: str) -> dict:
    values = parse_qs(query)
    return {name: values[name][0][:128] for name in views.FILTERS if values.get(name) and values[name][0]}


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgepack-dashboard"
    protocol_version = "HTTP/1.1"
    #: socket time-out: an idle keep-alive connection, a slow request and an event stream nobody reads
    #: (a blocked write) each give their thread back after this
    timeout = 30

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if not self.app.host_allowed(self.headers.get("Host")):
            # DNS rebinding: a page of another site whose name now points at 127.0.0.1 is not this host
            self._error(421, "this dashboard answers to its own address only (Host header)")
            return False
        return True

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.debug("dashboard " + format, *args)

    @property
    def app(self) -> "DashboardServer":
        return self.server.app  # type: ignore[attr-defined]

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        for key, value in {**_SECURITY, **(extra or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value, extra: dict | None = None) -> None:
        self._send(status, json.dumps(value, default=str).encode(), "application/json",
                   {"Cache-Control": "no-store", **(extra or {})})

    def _error(self, status: int, message: str, extra: dict | None = None) -> None:
        self._json(status, {"error": message}, extra)

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self):  # noqa: N802
        parts = urlsplit(self.path)
        path = parts.path
        if path in _FILES:
            name = _FILES[path]
            if name is None:
                return self._send(204, b"", "text/plain")
            file = STATIC / name
            return self._send(200, file.read_bytes(), _TYPES.get(file.suffix, "text/plain; charset=utf-8"),
                              {"Cache-Control": "no-cache"})
        filters = _filters(parts.query)
        snapshot = self.app.snapshots.latest or {}
        if path == "/api/snapshot":
            return self._json(200, filtered(snapshot, filters))
        if path == "/api/devices":
            return self._json(200, filtered(snapshot, filters).get("devices"))
        if path == "/api/rollouts":
            return self._json(200, snapshot.get("rollouts"))
        if path == "/api/series":
            return self._json(200, snapshot.get("series"))
        if path == "/api/events":
            if self.command == "HEAD":
                return self._send(200, b"", "text/event-stream; charset=utf-8")
            return self._stream(filters)
        return self._error(404, f"no such page: {path}; the dashboard is at /")

    def _stream(self, filters: dict) -> None:
        if not self.app.open_stream():
            return self._error(503, "too many open dashboards; retry shortly", {"Retry-After": "5"})
        try:
            self.send_response(200)
            for key, value in _SECURITY.items():
                self.send_header(key, value)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")  # nginx in front: do not buffer the stream
            self.end_headers()
            self.close_connection = True
            snapshots, seen = self.app.snapshots, 0
            self.wfile.write(b"retry: 2000\n\n")
            while not snapshots.stopped:
                seen, snapshot = snapshots.wait(seen, KEEPALIVE_S)
                if snapshot is None:
                    self.wfile.write(b": keep-alive\n\n")
                else:
                    data = (json.dumps(filtered(snapshot, filters), default=str, separators=(",", ":"))
                            if any(filters.values()) else snapshots.latest_text)
                    self.wfile.write(f"id: {seen}\nevent: snapshot\ndata: {data}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            pass  # the page went away
        finally:
            self.app.close_stream()

    def do_POST(self):  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return self._error(400, "Content-Length must be a number of bytes")
        if length > 65536:
            self.close_connection = True
            return self._error(413, "request body over 64 KiB")
        if length:
            self.rfile.read(length)
        match = _ACTION.match(urlsplit(self.path).path)
        if not match:
            return self._error(404, "actions are POST /api/rollouts/{id}/pause|resume|abort|rollback")
        if not self.app.authorised(self.headers.get("Authorization")):
            return self._error(401, "this action needs the dashboard token (Authorization: Bearer TOKEN; "
                                    "'fleet serve' printed it, or set it with --dashboard-token)",
                               {"WWW-Authenticate": 'Bearer realm="edgepack-fleet"'})
        rollout_id, action = int(match.group(1)), match.group(2)
        try:
            result = self.app.act(rollout_id, action)
        except EdgepackError as exc:
            return self._error(409, str(exc))
        self.app.snapshots.refresh()
        return self._json(200, result)

    def do_PUT(self):  # noqa: N802
        self._error(405, "the dashboard takes GET, and POST for actions", {"Allow": "GET, HEAD, POST"})

    do_DELETE = do_PATCH = do_PUT  # noqa: N815


class DashboardServer:
    """The dashboard on ``host:port`` over the registry at ``db_url``, in background threads."""

    def __init__(self, db_url: str | None, host: str, port: int, token: str | None = None, interval: float = 1.0,
                 window_s: float = 3600.0):
        from ..registry import FleetRegistry

        self.registry = FleetRegistry(db_url)
        self.token = token or secrets.token_urlsafe(18)
        self.snapshots = Snapshots(self.registry, interval, window_s)
        self._streams = 0
        self._lock = threading.Lock()
        try:
            self._httpd = ThreadingHTTPServer((host, port), _Handler)
        except OSError as exc:
            raise UsageError(f"--dashboard {host}:{port}: cannot listen there ({exc.strerror or exc}); "
                             "pick another port or stop what holds it") from None
        self._httpd.daemon_threads = True
        self._httpd.app = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="dashboard-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> "DashboardServer":
        self.snapshots.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self.snapshots.stop()
        self._httpd.shutdown()
        self._httpd.server_close()

    def host_allowed(self, header: str | None) -> bool:
        """On a loopback address only loopback names are this host (DNS rebinding); bound elsewhere,
        the operator chose who reaches it."""
        host = self._httpd.server_address[0]
        if not (host.startswith("127.") or host in ("::1", "localhost")):
            return True
        name = (header or "").strip().lower()
        name = name[1:].split("]", 1)[0] if name.startswith("[") else name.rsplit(":", 1)[0]
        return name in ("localhost", "::1") or name.startswith("127.")

    def authorised(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def open_stream(self) -> bool:
        with self._lock:
            if self._streams >= MAX_STREAMS:
                return False
            self._streams += 1
            return True

    def close_stream(self) -> None:
        with self._lock:
            self._streams -= 1

    def act(self, rollout_id: int, action: str) -> dict:
        """Do ``action`` on a rollout as the CLI would: pause/resume/abort are requests the rollout
        tick carries out; rollback starts a fleet rollback of every device on the rollout's release."""
        from ..rollouts import request, start_rollback, summary

        if action != "rollback":
            request(self.registry, rollout_id, action)
            log.info("dashboard: %s of rollout %d requested", action, rollout_id)
            return {"rollout": rollout_id, "requested": action}
        (head,) = summary(self.registry, rollout_id)
        if head["kind"] != "rollout" or not head.get("version"):
            raise EdgepackError(f"rollout {rollout_id} is a {head['kind']}; roll back a release's rollout")
        new_id = start_rollback(self.registry, None, release_of=(head["name"], head["version"]))
        log.info("dashboard: rollback %d of %s@%s started", new_id, head["name"], head["version"])
        return {"rollout": rollout_id, "rollback": new_id}
