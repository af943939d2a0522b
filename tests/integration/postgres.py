"""A real PostgreSQL on a free loopback port in a temporary folder (Debian's ``postgresql``: initdb +
pg_ctl, run as the ``postgres`` user when the tests run as root); skipped with the reason when there
is none."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .broker import free_port


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class Postgres:
    """``initdb`` in a fresh folder, ``pg_ctl start`` on a free port; ``url`` is a SQLAlchemy URL."""

    def __init__(self):
        initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if not initdb or not pg_ctl:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.skip("psycopg is not installed (pip install 'edgepack[fleet-pg]')")
        # Not under pytest's tmp_path: its parents are private to root, and the server runs as postgres.
        self.folder = Path(tempfile.mkdtemp(prefix="edgepack-pg-"))
        self.folder.chmod(0o755)
        self.port = free_port()
        self.pg_ctl = pg_ctl
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            if not shutil.which("runuser"):
                pytest.skip("PostgreSQL cannot run as root and there is no runuser")
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("PostgreSQL cannot run as root and there is no postgres user")
            shutil.chown(self.folder, "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.data = self.folder / "data"
        self._run([initdb, "-D", str(self.data), "-A", "trust", "-U", "edgepack", "--no-sync", "-E", "UTF8"])
        self._run([pg_ctl, "-D", str(self.data), "-l", str(self.folder / "pg.log"), "-w", "-t", "30",
                   "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])
        self.url = f"postgresql+psycopg://edgepack@127.0.0.1:{self.port}/postgres"

    def _run(self, args: list[str]) -> None:
        done = subprocess.run(self.prefix + args, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed: {done.stderr[-2000:]}")

    def stop(self) -> None:
        subprocess.run(self.prefix + [self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)
