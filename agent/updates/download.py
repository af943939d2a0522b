"""A bundle arriving in chunks: written to disk as each chunk comes (never held whole in memory),
resumable after a disconnect or a restart (the chunks already on disk are recorded beside the
partial file), and checked chunk by chunk against the digests the **signed** desired state lists.

A frame that does not match its signed digest, lies beyond the signed size or has the wrong length
is refused by itself (:class:`BadChunk`): the chunks already written stay, the download goes on and
the bad frame costs no attempt, so a forger on the broker can slow an update down but never block
it. Only the signed digests decide what is written; the sender's own header is not trusted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from edgepack.atomic import fsync_dir, write_json_atomic
from edgepack.bundle.format import sha256_file
from edgepack.fleet.desired import chunk_digest

from .errors import FatalUpdateError, TransientUpdateError

#: free space a download needs, as a multiple of the bundle: the part file, the staging copy and the
#: extracted files (which are about the bundle's size again)
SPACE_FACTOR = 3


class BadChunk(ValueError):
    """One frame refused (it does not match the signed chunk list); the download goes on."""


def free_bytes(folder: Path) -> int:
    """Bytes free for this process in the file system of ``folder``."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


class Download:
    """``<folder>/<sha256>.part`` and its record of received chunks ``<sha256>.json``."""

    def __init__(self, folder: Path, sha256: str, size: int, chunk_bytes: int, digests: list[bytes]):
        self.folder = Path(folder)
        self.sha256 = sha256
        self.size = size
        self.chunk_bytes = chunk_bytes
        self.digests = digests
        self.count = len(digests)
        self.part = self.folder / f"{sha256}.part"
        self.record = self.folder / f"{sha256}.json"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.received: set[int] = set()
        self.refused = 0  # frames dropped because they did not match the signed list
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.record.read_text())
        except (OSError, ValueError):
            data = {}
        if (isinstance(data, dict) and data.get("sha256") == self.sha256 and data.get("size") == self.size
                and data.get("chunk_bytes") == self.chunk_bytes and self.part.exists()):
            self.received = {i for i in data.get("received", []) if isinstance(i, int) and 0 <= i < self.count}
        else:
            self.received = set()

    def _save(self) -> None:
        write_json_atomic(self.record, {"sha256": self.sha256, "size": self.size, "chunk_bytes": self.chunk_bytes,
                                        "received": sorted(self.received), "chunks": self.count})

    @property
    def complete(self) -> bool:
        return len(self.received) == self.count

    @property
    def bytes_received(self) -> int:
        # a copy first: the HTTP source's thread adds to the set while the event loop reports progress
        return sum(self.expected_size(i) for i in tuple(self.received))

    def progress(self) -> dict:
        """Percent, bytes and chunks received (for events, telemetry and ``status``)."""
        done = self.bytes_received
        return {"percent": round(100.0 * done / self.size, 1), "bytes": done, "size": self.size,
                "chunks": len(self.received), "total_chunks": self.count, "refused_frames": self.refused}

    def missing(self) -> list[int]:
        received = set(self.received)
        return [i for i in range(self.count) if i not in received]

    def expected_size(self, index: int) -> int:
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)

    def begin(self) -> None:
        """Check the room (see :meth:`check_space`) and write the record, so ``status`` shows 0%."""
        self.check_space()
        if not self.record.exists():
            self._save()

    def check_space(self) -> None:
        """TransientUpdateError ``disk-full`` when the store lacks the room the update needs."""
        need = SPACE_FACTOR * self.size - (self.part.stat().st_size if self.part.exists() else 0)
        free = free_bytes(self.folder)
        if free < need:
            raise TransientUpdateError("disk-full", f"the update needs about {need // 1_000_000 + 1} MB free in "
                                       f"{self.folder} and {free // 1_000_000} MB are; free some space")

    def write(self, index: int, offset: int, data: bytes) -> bool:
        """Store one chunk after checking it against the signed list; False when it was a repeat.
        Raises BadChunk for a frame that does not match (nothing is written or discarded) and
        TransientUpdateError ``disk-full`` when the disk is full (the chunk is asked again later)."""
        if not 0 <= index < self.count or offset != index * self.chunk_bytes:
            raise BadChunk(f"chunk {index} at offset {offset} is not one of the {self.count} signed chunks")
        if len(data) != self.expected_size(index):
            raise BadChunk(f"chunk {index} holds {len(data)} bytes, the signed size allows {self.expected_size(index)}")
        if chunk_digest(data) != self.digests[index]:
            raise BadChunk(f"chunk {index} does not match its signed digest (forged or corrupted)")
        if index in self.received:
            return False
        try:
            fd = os.open(self.part, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            if not self.received:
                fsync_dir(self.folder)
            self.received.add(index)
            self._save()
        except OSError as exc:
            self.received.discard(index)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TransientUpdateError("disk-full", f"the disk is full while writing the download in {self.folder}; "
                                           "free some space (the chunks received so far are kept)") from None
            raise TransientUpdateError("disk", f"cannot write the download in {self.folder}: {exc.strerror}") from None
        return True

    def verify(self) -> Path:
        """The complete file after checking its size and sha256 (else FatalUpdateError, file removed:
        every chunk matched its signed digest, so a mismatch here means the signed list is wrong)."""
        actual = self.part.stat().st_size if self.part.exists() else 0
        if actual != self.size:
            self.discard()
            raise FatalUpdateError("size", f"the downloaded bundle has {actual} bytes, the desired state says {self.size}")
        if sha256_file(self.part) != self.sha256:
            self.discard()
            raise FatalUpdateError("sha256", "the downloaded bundle's sha256 does not match the signed desired state")
        return self.part

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)
        self.received = set()


def read_progress(store_root: Path) -> dict[str, dict]:
    """sha256 -> progress of every download on disk in a store (for ``edgepack-agent status``)."""
    found = {}
    for record in (Path(store_root) / "downloads").glob("*.json"):
        try:
            data = json.loads(record.read_text())
            done = len(data["received"])
            found[data["sha256"]] = {"chunks": done, "total_chunks": data.get("chunks"), "size": data["size"],
                                     "percent": round(100.0 * done / max(1, data.get("chunks") or 1), 1)}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def remove_leftovers(folder: Path, keep: set[str]) -> None:
    """Remove downloads whose sha256 is not in ``keep`` (a cancelled or finished update's files)."""
    for leftover in Path(folder).glob("*"):
        if leftover.name.split(".")[0] not in keep:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
