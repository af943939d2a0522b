"""A second, MQTT 3.1.1-only broker implementation for the tests: Aedes (Node.js, the broker behind
several clustered deployments; it has no MQTT 5), installed from the npm registry into ``.cache/``
on first use. Tests that need it are skipped with the reason when Node.js, npm or the registry is
missing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .broker import free_port

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "aedes"
VERSION = "1.2.0"

SERVER = """
import net from 'node:net'
import { Aedes } from 'aedes'
const port = Number(process.argv[2])
const aedes = await Aedes.createBroker()
aedes.on('clientError', (client, err) => console.log('client error', client && client.id, err.message))
aedes.on('connectionError', (client, err) => console.log('connection error', err.message))
net.createServer(aedes.handle).listen(port, '127.0.0.1', () => console.log('listening', port))
"""


def aedes_folder() -> Path:
    """The folder with aedes installed (installing it once); skips the test when that cannot be done."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("the MQTT 3.1.1-only broker test needs Node.js and npm (apt-get install nodejs npm)")
    if not (CACHE / "node_modules" / "aedes" / "package.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", f"aedes@{VERSION}"],
                                  cwd=CACHE, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("npm install aedes timed out (is the npm registry reachable?)")
        if done.returncode != 0:
            pytest.skip(f"npm install aedes@{VERSION} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    (CACHE / "server.mjs").write_text(SERVER)
    return CACHE


class AedesBroker:
    """Aedes on a free loopback port (in memory: no persistence across restarts)."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.log_path = Path(folder) / "aedes.log"
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        cache = aedes_folder()
        self.process = subprocess.Popen(["node", str(cache / "server.mjs"), str(self.port)], cwd=cache,
                                        stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("aedes exited: " + self.log_path.read_text())
                time.sleep(0.05)
        raise RuntimeError("aedes did not start")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.log.close()
