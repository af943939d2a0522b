"""Start the real ``edgepack-agent run`` daemon as a subprocess and wait until it serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Daemon:
    """A running agent daemon; ``url`` is its base URL, ``logs`` its parsed JSON log lines."""

    def __init__(self, *args, env: dict | None = None, timeout: float = 60, python_code: str | None = None):
        if python_code:
            self.args = [sys.executable, "-c", python_code]
        else:
            self.args = [sys.executable, "-m", "agent.cli", "run", "--port", "0", *map(str, args)]
        self.process = subprocess.Popen(self.args, cwd=ROOT, env={**os.environ, **(env or {})},
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self._wait_for_port(timeout)
        #: the gRPC port when the daemon serves gRPC (--grpc-port), else None
        self.grpc_port = next((entry.get("grpc_port") for entry in self.logs if entry.get("msg") == "serving"), None)
        self.grpc_address = f"127.0.0.1:{self.grpc_port}" if self.grpc_port else None
        self.scheme = "https" if self._tls() else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def logs(self) -> list[dict]:
        entries = []
        for line in list(self.lines):
            try:
                entries.append(json.loads(line))
            except ValueError:
                entries.append({"msg": line, "raw": True})
        return entries

    def _tls(self) -> bool:
        return any(entry.get("msg") == "serving" and entry.get("tls") for entry in self.logs)

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.logs:
                if entry.get("msg") == "serving":
                    return entry["port"]
            if self.process.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n" + "\n".join(self.lines))
            time.sleep(0.05)
        self.process.kill()
        raise RuntimeError("daemon did not start in time:\n" + "\n".join(self.lines))

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig``, wait for exit, return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self._reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
