"""A real nginx (Debian's) on a free loopback port, serving a folder at ``/bundles/`` with Range
support, optionally over TLS and rate limited; its access log records each request's status, Range
header, bytes sent and User-Agent. Skipped with the reason when nginx is not installed."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .broker import free_port


def _binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


class Nginx:
    """``nginx -g 'daemon off;'`` with one process (so ``kill()`` is a real kill -9 of the server)."""

    def __init__(self, root: Path, port: int | None = None, rate: str | None = None,
                 tls: tuple[Path, Path] | None = None):
        self.binary = _binary()
        if not self.binary:
            pytest.skip("nginx is not installed (apt-get install nginx)")
        self.root, self.rate, self.tls = Path(root), rate, tls
        self.folder = Path(tempfile.mkdtemp(prefix="edgepack-nginx-"))
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/bundles/"
        self.log = self.folder / "access.log"
        self._write_config()

    def _write_config(self) -> None:
        folder = self.folder
        listen = f"127.0.0.1:{self.port}" + (" ssl" if self.tls else "")
        tls = (f"ssl_certificate {self.tls[0]}; ssl_certificate_key {self.tls[1]};" if self.tls else "")
        rate = f"limit_rate {self.rate};" if self.rate else ""
        (folder / "nginx.conf").write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format ranges '$status "$http_range" $body_bytes_sent "$http_user_agent"';
    access_log {folder}/access.log ranges;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    types {{ application/octet-stream edgepack; }}
    sendfile on;
    keepalive_requests 10000;
    server {{
        listen {listen};
        {tls}
        location /bundles/ {{ alias {self.root}/; {rate} }}
    }}
}}
""")

    def start(self) -> "Nginx":
        self.process = subprocess.Popen([self.binary, "-p", str(self.folder), "-e", str(self.folder / "error.log"),
                                         "-c", str(self.folder / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx did not start: {self.process.stderr.read().decode()[-1000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not listen within 15 s")

    def kill(self) -> None:
        """kill -9: connections in flight are cut mid-body."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def requests(self) -> list[dict]:
        """Every request nginx logged: status, range, bytes sent, user agent."""
        found = []
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                status, rest = line.split(" ", 1)
                quoted = rest.split('"')
                found.append({"status": int(status), "range": quoted[1], "bytes": int(quoted[2].strip()),
                              "agent": quoted[3]})
        return found

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
