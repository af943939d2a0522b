"""Signing an existing bundle: verify it fully, then rewrite it with the new signature added."""

from __future__ import annotations

from pathlib import Path

from .reader import open_bundle
from .signing import key_id, load_private_key, sign_manifest
from ..atomic import atomic_write
from .writer import pack_members


def sign_bundle(path: Path, private_key_path: Path) -> str:
    """Add (or replace) this key's signature on the bundle at ``path``; return the key id."""
    key = load_private_key(private_key_path)
    with open_bundle(path, verify_files=True) as bundle:
        files = {name: bundle.read_file(name) for name in bundle.manifest["files"]}
        signatures = sign_manifest(bundle.manifest_bytes, key, bundle.signatures)
        data = pack_members(bundle.manifest_bytes, files, signatures)
    atomic_write(Path(path), data)
    return key_id(key.public_key())
