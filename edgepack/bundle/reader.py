"""Reading bundles as untrusted input.

Order of checks (DESIGN.md section 4): the member table (names, links, sizes) first; then the raw
manifest bytes are read and their signature verified **before** they are parsed; then the manifest is
checked against the member table; every file's sha256 is checked before its bytes are returned.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BundleError, InputFileError, SignatureError
from . import format as fmt
from .container import check_container
from .manifest import check_manifest
from .signing import verify_manifest_signatures


def _check_member_name(name: str) -> None:
    if not name or name.startswith(("/", "\\")) or "\\" in name or ":" in name.split("/")[0]:
        raise BundleError(f"bundle member {name!r} has an absolute or non-portable path; refusing the bundle")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts) or posixpath.normpath(name) != name:
        raise BundleError(f"bundle member {name!r} escapes the bundle (path traversal); refusing the bundle")


def _check_member(info: zipfile.ZipInfo) -> None:
    _check_member_name(info.filename)
    mode = info.external_attr >> 16
    if info.is_dir():
        raise BundleError(f"bundle member {info.filename!r} is a directory entry; refusing the bundle")
    if stat.S_ISLNK(mode) or (mode and not stat.S_ISREG(mode)):
        raise BundleError(f"bundle member {info.filename!r} is a link or special file; refusing the bundle")
    if info.file_size > fmt.MAX_MEMBER_BYTES:
        raise BundleError(f"bundle member {info.filename!r} is oversized ({info.file_size} bytes); refusing")
    if info.flag_bits & 0x1:
        raise BundleError(f"bundle member {info.filename!r} is encrypted; refusing the bundle")


def _read_bounded(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """Read a member, never more than ``limit`` bytes even if its header lies about the size."""
    if info.file_size > limit:
        raise BundleError(f"bundle member {info.filename!r} is oversized ({info.file_size} > {limit} bytes)")
    try:
        with archive.open(info) as stream:
            data = stream.read(limit + 1)
    except Exception as exc:  # CRC mismatches (BadZipFile), short reads, zlib.error: bytes changed after writing
        raise BundleError(f"bundle member {info.filename!r} is corrupt ({exc}); re-download the bundle") from None
    if len(data) > limit or len(data) != info.file_size:
        raise BundleError(f"bundle member {info.filename!r} does not have its declared size; refusing")
    return data


def _validate_manifest(manifest) -> None:
    if not isinstance(manifest, dict):
        raise BundleError("manifest.json is not a JSON object; refusing the bundle")
    if manifest.get("schema") not in fmt.SUPPORTED_SCHEMAS:
        raise BundleError(
            f"bundle schema {manifest.get('schema')!r} is not supported by this edgepack "
            f"(supports {', '.join(fmt.SUPPORTED_SCHEMAS)}); upgrade edgepack"
        )
    check_manifest(manifest)
    if not fmt.is_valid_name(manifest["name"]) or not fmt.is_valid_semver(manifest["version"]):
        raise BundleError("manifest.json: name or version is malformed; refusing the bundle")
    for name in manifest["files"]:
        _check_member_name(name)
        if name.lower().endswith(fmt.PICKLE_SUFFIXES):
            raise BundleError(f"bundle member {name!r} is pickled content, which is never accepted")


@dataclass
class Bundle:
    """An opened, structurally verified bundle; file contents are hash-checked as they are read."""

    path: Path
    manifest: dict
    manifest_bytes: bytes
    signatures: dict | None
    signed_by: list[str] = field(default_factory=list)
    _archive: zipfile.ZipFile | None = None

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def profile(self) -> str:
        return self.manifest["profile"]

    def read_file(self, name: str) -> bytes:
        """The bytes of a listed file, after checking its size and sha256."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"bundle has no file {name!r}")
        info = self._archive.getinfo(name)
        data = _read_bounded(self._archive, info, entry["size"])
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BundleError(f"bundle file {name!r} does not match its sha256 (tampered or corrupt); refusing")
        if fmt.looks_pickled(data):
            raise BundleError(f"bundle file {name!r} holds pickled content, which is never accepted")
        return data

    def read_array(self, name: str) -> np.ndarray:
        """A hash-checked .npy file as an array (object/pickled arrays refused)."""
        data = self.read_file(name)
        try:
            return fmt.npy_to_array(data)
        except ValueError as exc:
            raise BundleError(f"bundle file {name!r} is not a plain numpy array ({exc}); refusing") from None

    def read_json(self, name: str):
        """A hash-checked JSON file."""
        try:
            return json.loads(self.read_file(name))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BundleError(f"bundle file {name!r} is not valid JSON; refusing") from None

    def verify_all(self) -> None:
        """Check every listed file's hash (and pickles) now."""
        for name in self.manifest["files"]:
            self.read_file(name)

    def extract_to(self, folder: Path) -> dict[str, Path]:
        """Write every verified file under ``folder``; return the paths by member name."""
        folder = Path(folder)
        paths = {}
        for name in sorted(self.manifest["files"]):
            data = self.read_file(name)
            target = folder.joinpath(*name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            paths[name] = target
        return paths

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_bundle(path, public_keys=None, require_signature: bool = False, verify_files: bool = True) -> Bundle:
    """Open and verify a bundle.

    ``public_keys``: ed25519 public keys; when given, at least one valid signature by one of them is
    required. ``verify_files``: check every file hash now (else as each file is read).
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"bundle {path} does not exist or is not a file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise BundleError(f"{path.name} is not a readable edgepack bundle ({exc}); re-download or rebuild it") from None
    try:
        bundle = _open(path, archive, public_keys, require_signature)
        if verify_files:
            bundle.verify_all()
        return bundle
    except BaseException:
        archive.close()
        raise


def _open(path: Path, archive: zipfile.ZipFile, public_keys, require_signature: bool) -> Bundle:
    infos = archive.infolist()
    if len(infos) > fmt.MAX_MEMBERS:
        raise BundleError(f"bundle has too many members ({len(infos)}); refusing")
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise BundleError("bundle has duplicate member names; refusing the bundle")
    for info in infos:
        _check_member(info)
    check_container(archive.fp, path.stat().st_size, infos)
    if sum(info.file_size for info in infos) > fmt.MAX_TOTAL_BYTES:
        raise BundleError("bundle is oversized; refusing")
    if fmt.MANIFEST_NAME not in names:
        raise BundleError("bundle has no manifest.json; not an edgepack bundle")

    manifest_bytes = _read_bounded(archive, archive.getinfo(fmt.MANIFEST_NAME), fmt.MAX_MANIFEST_BYTES)
    signatures = None
    if fmt.SIGNATURES_NAME in names:
        raw = _read_bounded(archive, archive.getinfo(fmt.SIGNATURES_NAME), fmt.MAX_SIGNATURES_BYTES)
        try:
            signatures = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise SignatureError("signatures.json is not valid JSON; refusing the bundle") from None
    # The signature covers the raw manifest bytes and is checked before the manifest is parsed.
    signed_by = verify_manifest_signatures(manifest_bytes, signatures, public_keys or [])
    if (public_keys or require_signature) and not signed_by:
        if not signatures:
            raise SignatureError("bundle is not signed but a signature is required; sign it with 'edgepack sign'")
        raise SignatureError("bundle signature does not match any trusted key; refusing the bundle")

    try:
        manifest = json.loads(manifest_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BundleError("manifest.json is not valid JSON; refusing the bundle") from None
    _validate_manifest(manifest)

    listed = set(manifest["files"])
    present = set(names) - {fmt.MANIFEST_NAME, fmt.SIGNATURES_NAME}
    if present - listed:
        raise BundleError(f"bundle holds files not in its manifest: {', '.join(sorted(present - listed))}; refusing")
    if listed - present:
        raise BundleError(f"bundle lacks files its manifest lists: {', '.join(sorted(listed - present))}; refusing")
    for info in infos:
        if info.filename in listed and info.file_size != manifest["files"][info.filename]["size"]:
            raise BundleError(f"bundle file {info.filename!r} does not have the size its manifest lists; refusing")
    return Bundle(path, manifest, manifest_bytes, signatures, signed_by, archive)
