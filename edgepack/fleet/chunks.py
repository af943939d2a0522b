"""Bundle transfer over MQTT: chunk requests (JSON) and chunk frames (binary).

A chunk frame is ``b"EPC1"``, a 4-byte big-endian header length, the JSON header
``{"schema", "sha256" (of the bundle), "index", "offset", "size", "chunk_sha256"}`` and the raw bytes:
no base64, so the bytes on the wire stay within a few per mille of the bundle size. Chunks hold at
most :data:`CHUNK_BYTES` of data, so a whole message stays under AWS IoT Core's 128 KiB limit.
"""

from __future__ import annotations

import hashlib
import json
import struct

from .topics import SCHEMA

MAGIC = b"EPC1"
#: data bytes per chunk: 128 KiB less room for the header and MQTT's own framing
CHUNK_BYTES = 128 * 1024 - 1024
MAX_HEADER = 1024


class ChunkError(ValueError):
    """A chunk frame or request that does not parse; ``index`` is the chunk's when its header read."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def chunk_count(size: int) -> int:
    return max(1, -(-size // CHUNK_BYTES))


def encode_frame(bundle_sha256: str, index: int, data: bytes) -> bytes:
    """One chunk of the bundle ``bundle_sha256`` as a frame."""
    header = json.dumps({"schema": SCHEMA, "sha256": bundle_sha256, "index": index, "offset": index * CHUNK_BYTES,
                         "size": len(data), "chunk_sha256": hashlib.sha256(data).hexdigest()},
                        separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(header)) + header + data


def decode_frame(payload: bytes) -> tuple[dict, bytes]:
    """(header, data) of a frame; raises ChunkError for anything malformed, including a data hash
    that does not match the header (corrupted in transit)."""
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise ChunkError("not a chunk frame")
    (length,) = struct.unpack(">I", payload[4:8])
    if length > MAX_HEADER or 8 + length > len(payload):
        raise ChunkError("chunk header length out of range")
    try:
        header = json.loads(payload[8:8 + length])
    except ValueError:
        raise ChunkError("chunk header is not JSON") from None
    if not isinstance(header, dict):
        raise ChunkError("chunk header is not an object")
    data = payload[8 + length:]
    for key, kind in (("sha256", str), ("index", int), ("offset", int), ("size", int), ("chunk_sha256", str)):
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise ChunkError(f"chunk header field {key!r} is missing or has the wrong type")
    if header["size"] != len(data):
        raise ChunkError(f"chunk {header['index']} carries {len(data)} bytes, its header says {header['size']}",
                         header["index"])
    if hashlib.sha256(data).hexdigest() != header["chunk_sha256"]:
        raise ChunkError(f"chunk {header['index']} is corrupted (its sha256 does not match)", header["index"])
    return header, data


def request(bundle_sha256: str, indexes: list[int]) -> bytes:
    """The JSON of a chunk request."""
    return json.dumps({"schema": SCHEMA, "sha256": bundle_sha256, "chunks": list(indexes)}).encode()


def parse_request(payload: bytes) -> tuple[str, list[int]]:
    """(bundle sha256, chunk indexes) of a request; raises ChunkError."""
    try:
        data = json.loads(payload)
    except ValueError:
        raise ChunkError("chunk request is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
        raise ChunkError("chunk request needs a sha256")
    chunks = data.get("chunks")
    if not isinstance(chunks, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in chunks) or len(chunks) > 256:
        raise ChunkError("chunk request needs 'chunks': a list of at most 256 indexes")
    return data["sha256"], chunks
