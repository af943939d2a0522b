"""ed25519 signing keys and bundle signatures (with the ``cryptography`` package)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import InputFileError, SignatureError
from .format import SIGNATURES_SCHEMA

PRIVATE_KEY_NAME = "edgepack-signing.key"
PUBLIC_KEY_NAME = "edgepack-signing.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable identifier of a public key (sha256 of its raw bytes, 16 hex digits)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(folder: Path) -> tuple[Path, Path]:
    """Write a new key pair into ``folder`` (private key mode 0600); refuse to overwrite one."""
    folder = Path(folder)
    private_path, public_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if private_path.exists() or public_path.exists():
        raise InputFileError(f"{folder} already holds signing keys; choose another --out or remove them first")
    folder.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    handle = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "wb") as out:
        out.write(pem)
    public_path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an ed25519 private key (PEM, PKCS8)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise InputFileError(f"cannot read private key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise InputFileError(f"{path} is not a PEM ed25519 private key; create one with 'edgepack keys generate'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputFileError(f"{path} is not an ed25519 key; create one with 'edgepack keys generate'")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an ed25519 public key (PEM)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise InputFileError(f"cannot read public key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise InputFileError(f"{path} is not a PEM ed25519 public key (the .pub from 'edgepack keys generate')") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputFileError(f"{path} is not an ed25519 public key")
    return key


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey, existing: dict | None = None) -> dict:
    """A signatures document with a signature of ``manifest_bytes`` added (replacing this key's old one)."""
    kid = key_id(private_key.public_key())
    entries = [e for e in (existing or {}).get("signatures", []) if isinstance(e, dict) and e.get("key_id") != kid]
    entries.append(
        {
            "algorithm": "ed25519",
            "key_id": kid,
            "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode(),
        }
    )
    return {"schema": SIGNATURES_SCHEMA, "signatures": sorted(entries, key=lambda e: e["key_id"])}


def verify_manifest_signatures(manifest_bytes: bytes, signatures, public_keys) -> list[str]:
    """Key ids of the trusted ``public_keys`` that validly signed ``manifest_bytes``.

    A signature by a trusted key that does not verify is an error (tampering), not just "unsigned".
    """
    if not signatures or not public_keys:
        return []
    if not isinstance(signatures, dict) or signatures.get("schema") != SIGNATURES_SCHEMA:
        raise SignatureError("signatures.json has an unknown format; refusing the bundle")
    trusted = {key_id(key): key for key in public_keys}
    valid = []
    entries = signatures.get("signatures", [])
    if not isinstance(entries, list):
        raise SignatureError("signatures.json: 'signatures' must be a list; refusing the bundle")
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("algorithm") != "ed25519":
            continue
        if not isinstance(entry.get("key_id"), str) or not isinstance(entry.get("signature", ""), str):
            raise SignatureError("signatures.json: a signature entry's key_id and signature must be strings; refusing")
        key = trusted.get(entry.get("key_id"))
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(entry.get("signature", ""), validate=True), manifest_bytes)
        except (InvalidSignature, ValueError):
            raise SignatureError(
                f"bundle signature by key {entry['key_id']} is invalid: the manifest was changed after signing"
            ) from None
        valid.append(entry["key_id"])
    return valid
