"""Writing bundles: deterministic bytes, atomic on disk (no half-written file is ever visible)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from .manifest import check_manifest
from .format import (
    CREATE_SYSTEM,
    FILE_MODE,
    FIXED_ZIP_TIME,
    MANIFEST_NAME,
    SCHEMA,
    SIGNATURES_NAME,
    array_to_npy,
    canonical_json,
    sha256_hex,
)


class BundleWriter:
    """Collects the files of a bundle in memory, then writes them with a manifest in one go."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}

    def add_bytes(self, arcname: str, data: bytes) -> str:
        """Add a file; return its name in the bundle."""
        if arcname in (MANIFEST_NAME, SIGNATURES_NAME) or arcname.startswith("/") or ".." in arcname.split("/"):
            raise ValueError(f"reserved or unsafe bundle member name: {arcname}")
        self._files[arcname] = bytes(data)
        return arcname

    def add_file(self, arcname: str, path: Path) -> str:
        """Add a file read from disk."""
        return self.add_bytes(arcname, Path(path).read_bytes())

    def add_array(self, arcname: str, array: np.ndarray) -> str:
        """Add one array as a .npy file."""
        return self.add_bytes(arcname, array_to_npy(array))

    def file_entries(self) -> dict[str, dict]:
        """The manifest's ``files`` table: size and sha256 per member."""
        return {name: {"size": len(data), "sha256": sha256_hex(data)} for name, data in sorted(self._files.items())}

    def build(self, manifest: dict, signatures: dict | None = None) -> tuple[bytes, bytes]:
        """Return (bundle bytes, manifest bytes) for ``manifest`` completed with the file table."""
        manifest = dict(manifest)
        manifest.setdefault("schema", SCHEMA)
        manifest["files"] = self.file_entries()
        check_manifest(manifest)  # a builder bug is caught here, not on the device
        manifest_bytes = canonical_json(manifest)
        return pack_members(manifest_bytes, self._files, signatures), manifest_bytes

    def write(self, path: Path, manifest: dict, signatures: dict | None = None) -> bytes:
        """Write the bundle atomically to ``path``; return the manifest bytes."""
        data, manifest_bytes = self.build(manifest, signatures)
        atomic_write(Path(path), data)
        return manifest_bytes


def pack_members(manifest_bytes: bytes, files: dict[str, bytes], signatures: dict | None) -> bytes:
    """Zip the members in a fixed order with fixed metadata, so equal content gives equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        members = [(MANIFEST_NAME, manifest_bytes)]
        if signatures:
            members.append((SIGNATURES_NAME, canonical_json(signatures)))
        members += sorted(files.items())
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
            # Stored, not deflated: every byte of the file is then covered by a CRC and a sha256 (a flipped
            # padding bit of a deflate stream would go unnoticed), and models compress poorly anyway.
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = FILE_MODE << 16
            info.create_system = CREATE_SYSTEM
            archive.writestr(info, data)
    return buffer.getvalue()


def write_bundle(path: Path, manifest: dict, files: dict[str, bytes], signatures: dict | None = None) -> bytes:
    """Convenience: write a bundle from a dict of member bytes; return the manifest bytes."""
    writer = BundleWriter()
    for name, data in files.items():
        writer.add_bytes(name, data)
    return writer.write(path, manifest, signatures)
