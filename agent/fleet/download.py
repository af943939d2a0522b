"""A bundle arriving in chunks: written to disk as each chunk comes (never held whole in memory),
resumable after a disconnect or a restart (the chunks already on disk are recorded beside the
partial file), and bounded by the size the signed desired state gives: a chunk beyond it, of the
wrong size, or far more data than the bundle needs cuts the download off and removes the partial file.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgepack.bundle.format import sha256_file
from edgepack.atomic import fsync_dir, write_json_atomic
from edgepack.errors import EdgepackError
from edgepack.fleet.chunks import CHUNK_BYTES, chunk_count

#: bytes accepted in all (repeats included) before a download is cut off, as a multiple of its size
MAX_RECEIVED_FACTOR = 3


class DownloadError(EdgepackError):
    """The download cannot finish; ``reason`` is a short word (oversized, size, sha256, too-much-data)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Download:
    """``<folder>/<sha256>.part`` and its record of received chunks ``<sha256>.json``."""

    def __init__(self, folder: Path, sha256: str, size: int):
        self.folder = Path(folder)
        self.sha256 = sha256
        self.size = size
        self.count = chunk_count(size)
        self.part = self.folder / f"{sha256}.part"
        self.record = self.folder / f"{sha256}.json"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.received: set[int] = set()
        self.bytes_received = 0
        self._load()

    def _load(self) -> None:
        import json

        try:
            data = json.loads(self.record.read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("sha256") == self.sha256 and data.get("size") == self.size and self.part.exists():
            self.received = {i for i in data.get("received", []) if isinstance(i, int) and 0 <= i < self.count}
            self.bytes_received = int(data.get("bytes_received", 0))
        else:
            self.received = set()

    def _save(self) -> None:
        write_json_atomic(self.record, {"sha256": self.sha256, "size": self.size, "received": sorted(self.received),
                                        "bytes_received": self.bytes_received})

    @property
    def complete(self) -> bool:
        return len(self.received) == self.count

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.received]

    def expected_size(self, index: int) -> int:
        return min(CHUNK_BYTES, self.size - index * CHUNK_BYTES)

    def write(self, header: dict, data: bytes) -> bool:
        """Store one decoded chunk (its hash already checked); False when it was a repeat. Raises
        DownloadError (and removes the partial file) when the stream goes beyond the signed size."""
        index = header["index"]
        self.bytes_received += len(data)
        if self.bytes_received > MAX_RECEIVED_FACTOR * self.size + CHUNK_BYTES:
            self.discard()
            raise DownloadError("too-much-data", f"received {self.bytes_received} bytes for a bundle of {self.size}; "
                                "the stream was cut off")
        if index < 0 or index >= self.count or header["offset"] != index * CHUNK_BYTES:
            self.discard()
            raise DownloadError("oversized", f"chunk {index} lies beyond the signed size of {self.size} bytes; "
                                "the stream was cut off")
        if len(data) != self.expected_size(index):
            self.discard()
            raise DownloadError("size", f"chunk {index} holds {len(data)} bytes, the signed size allows "
                                f"{self.expected_size(index)}; the stream was cut off")
        if index in self.received:
            return False
        fd = os.open(self.part, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data, header["offset"])
            os.fsync(fd)
        finally:
            os.close(fd)
        if len(self.received) == 0:
            fsync_dir(self.folder)
        self.received.add(index)
        self._save()
        return True

    def verify(self) -> Path:
        """The complete file after checking its size and sha256 (else DownloadError, file removed)."""
        if not self.part.exists() or self.part.stat().st_size != self.size:
            actual = self.part.stat().st_size if self.part.exists() else 0
            self.discard()
            raise DownloadError("size", f"the downloaded bundle has {actual} bytes, the desired state says {self.size}")
        if sha256_file(self.part) != self.sha256:
            self.discard()
            raise DownloadError("sha256", "the downloaded bundle's sha256 does not match the signed desired state")
        return self.part

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)
        self.received = set()
