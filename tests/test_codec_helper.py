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


def _second_call_waits(helpers: int) -> tuple[bool, set[int]]:
    """Whether a quick call waited for a long one that was handed to the codec first, and the helpers'
    pids (real helper processes: ``os.getpid`` in each)."""
    import asyncio

    from agent.serving.codec import Codec

    async def main():
        codec = Codec(1, 1 << 20, helpers)
        await codec.start()
        try:
            slow = asyncio.ensure_future(codec._call(time.sleep, 4.0))
            await asyncio.sleep(0.2)  # the slow call is in a helper
            pid = await codec._call(os.getpid)
            waited = slow.done()
            await slow
            return waited, {pid, await codec._call(os.getpid)}
        finally:
            await codec.close()

    return asyncio.run(main())


def test_two_large_bodies_decode_side_by_side_in_two_helpers():
    from agent.serving.codec import default_helpers

    waited, pids = _second_call_waits(2)
    assert not waited, "a second helper would have taken the quick call while the first was busy"
    assert os.getpid() not in pids
    waited, pids = _second_call_waits(1)
    assert waited and len(pids) == 1 and os.getpid() not in pids
    assert default_helpers() == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)
