"""The codec's helper process (large bodies are decoded there) leaves when the daemon is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import os, sys, time
from agent.serving.codec import Codec
codec = Codec(1, 1 << 20)
print(codec._executor().submit(os.getpid).result(), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_helper_exits_when_the_daemon_is_killed_with_sigkill():
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        helper = int(holder.stdout.readline())
        assert helper != holder.pid and _alive(helper)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 10
        while _alive(helper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(helper), "the helper outlived its daemon"
    finally:
        holder.kill()
        try:
            os.kill(helper, signal.SIGKILL)
        except (OSError, UnboundLocalError):
            pass
