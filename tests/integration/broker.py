"""A real Mosquitto broker on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_path() -> str:
    """The mosquitto binary (installed by .ci/test.sh); skips the test when there is none."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip("mosquitto is not installed (apt-get install mosquitto)")


class Broker:
    """``mosquitto -c conf`` in ``folder``; ``stop()``/``start()`` keep the port and the persistence."""

    def __init__(self, folder: Path, port: int | None = None, extra: str = ""):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen | None = None
        self.start()

    def config(self) -> str:
        return (f"listener {self.port} 127.0.0.1\n"
                f"persistence true\npersistence_location {self.folder}/\nuser root\n"
                "max_inflight_messages 100\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
                + (self.extra or "allow_anonymous true\n"))

    def start(self) -> None:
        conf = self.folder / "mosquitto.conf"
        conf.write_text(self.config())
        self.log = open(self.folder / "mosquitto.log", "ab")
        self.process = subprocess.Popen([mosquitto_path(), "-c", str(conf)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("mosquitto exited: " + (self.folder / "mosquitto.log").read_text())
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.log.close()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"
