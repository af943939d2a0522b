"""Constants and small helpers of the bundle format shared by writer and reader."""

from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np

SCHEMA = "edgepack.bundle/v1"
SUPPORTED_SCHEMAS = (SCHEMA,)
MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "signatures.json"
SIGNATURES_SCHEMA = "edgepack.signatures/v1"
BUNDLE_SUFFIX = ".edgepack"

#: Zip entries all carry this timestamp so that the same content gives the same bytes.
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o100644  # regular file, rw-r--r--
CREATE_SYSTEM = 3  # unix, so the mode bits are meaningful on every host
ZIP_VERSION = 20

# Limits a reader enforces before reading anything (a bundle is untrusted input on a device).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_SIGNATURES_BYTES = 256 * 1024
MAX_MEMBER_BYTES = 2 * 1024**3
MAX_TOTAL_BYTES = 4 * 1024**3
MAX_MEMBERS = 4096

#: File name extensions that mean pickled content; never accepted in a bundle.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt")


_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def canonical_json(data) -> bytes:
    """JSON with sorted keys and no whitespace variance: the signed, hashed form."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read a block at a time (bundles and models can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_valid_semver(version: str) -> bool:
    """True for a semantic version such as ``1.2.3`` or ``1.0.0-rc.1``."""
    return isinstance(version, str) and bool(_SEMVER.fullmatch(version))


def is_valid_name(name: str) -> bool:
    """True for a model name usable in file names, URLs and MQTT topics."""
    # fullmatch: with match, "$" also matches before a trailing newline ("model\n" would pass)
    return isinstance(name, str) and bool(_NAME.fullmatch(name))


def bundle_filename(name: str, version: str, profile: str) -> str:
    """``NAME-VERSION-PROFILE.edgepack`` (DESIGN.md section 4)."""
    return f"{name}-{version}-{profile}{BUNDLE_SUFFIX}"


def array_to_npy(array: np.ndarray) -> bytes:
    """Serialize one array to .npy bytes (deterministic, never pickled)."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise ValueError("object arrays cannot be stored in a bundle")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_to_array(data: bytes) -> np.ndarray:
    """Parse .npy bytes; pickled (object) arrays are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def looks_pickled(data: bytes) -> bool:
    """True when ``data`` starts like a pickle stream (protocol 2 or newer)."""
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5
