"""Bundles and releases on the controller.

The shelf stores each bundle under its own sha256 (``<sha256>.edgepack``, written to a temporary
file, fsynced and renamed), so what is served for a hash is always the bytes of that hash: a rebuilt
bundle with the same file name is another file. A **release** is one model version with one signed
bundle per profile, registered once; registering it again with the same bundles is a no-op, with other
bytes it is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from edgepack.bundle.format import sha256_file
from edgepack.errors import UsageError

from . import chunks
from .db import bundles, release_bundles, releases


class BundleShelf:
    """The bundles the controller can send, stored by sha256 in one folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.edgepack"

    def find(self, sha256: str) -> Path | None:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            return None
        path = self.path(sha256)
        return path if path.is_file() else None

    def add(self, bundle: Path, sha256: str | None = None) -> Path:
        """Store ``bundle`` under its hash (atomically; nothing to do when it is there already)."""
        sha256 = sha256 or sha256_file(bundle)
        target = self.path(sha256)
        if target.is_file():
            return target
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=self.folder, prefix=".incoming-")
        try:
            with os.fdopen(handle, "wb") as out, open(bundle, "rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            if sha256_file(temp) != sha256:
                raise UsageError(f"{bundle} changed while it was being copied; add it again")
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return target


def describe_bundle(path: Path) -> dict:
    """The bundle's row: verified (every file's digest), with its signed chunk list."""
    from edgepack.bundle import open_bundle

    from .desired import chunk_digests_of

    with open_bundle(path, verify_files=True) as bundle:
        manifest = bundle.manifest
        signed = bool(bundle.signatures)
    if not signed:
        raise UsageError(f"{path} is not signed; sign it with 'edgepack sign {path} --key PRIV' (devices refuse "
                         "unsigned bundles)")
    return {"sha256": sha256_file(path), "size": Path(path).stat().st_size, "name": manifest["name"],
            "version": manifest["version"], "profile": manifest["profile"], "chunk_bytes": chunks.CHUNK_BYTES,
            "chunks": chunk_digests_of(path, chunks.CHUNK_BYTES)}


def register_bundles(registry, shelf: BundleShelf, paths: list[Path]) -> list[dict]:
    """Store bundle files on the shelf and in the ``bundles`` table; their rows."""
    rows = []
    for path in paths:
        row = describe_bundle(path)
        shelf.add(path, row["sha256"])
        rows.append(row)
    with registry.engine.begin() as db:
        for row in rows:
            db.execute(registry.insert(bundles).values(**row, added=time.time()).on_conflict_do_nothing())
    return rows


def add_release(registry, shelf: BundleShelf, paths: list[Path], notes: str | None = None) -> dict:
    """Register one release from its bundles (one per profile, one model version)."""
    rows = [describe_bundle(p) for p in paths]
    models = {(r["name"], r["version"]) for r in rows}
    if len(models) != 1:
        raise UsageError("the bundles are of " + ", ".join(f"{n} {v}" for n, v in sorted(models)) +
                         "; a release is one model version (one bundle per profile)")
    profiles = [r["profile"] for r in rows]
    if len(set(profiles)) != len(profiles):
        raise UsageError("two bundles for one profile; a release has one bundle per profile")
    name, version = models.pop()

    def check(db) -> None:
        known = {r.profile: r.sha256 for r in db.execute(
            select(release_bundles).where(release_bundles.c.name == name).where(release_bundles.c.version == version))}
        for row in rows:
            if row["profile"] in known and known[row["profile"]] != row["sha256"]:
                raise UsageError(f"release {name}@{version} already has other bytes for profile {row['profile']!r}; "
                                 "a release is immutable: give the new build a new version")

    with registry.engine.connect() as db:
        check(db)  # before anything is stored
    for path, row in zip(paths, rows):
        shelf.add(path, row["sha256"])
    now = time.time()
    with registry.engine.begin() as db:
        check(db)  # again in the transaction: another 'release add' may have come in between
        for row in rows:
            db.execute(registry.insert(bundles).values(**row, added=now).on_conflict_do_nothing())
            db.execute(registry.insert(release_bundles).values(name=name, version=version, profile=row["profile"],
                                                               sha256=row["sha256"]).on_conflict_do_nothing())
        db.execute(registry.insert(releases).values(name=name, version=version, notes=notes, created=now)
                   .on_conflict_do_nothing())
    return release(registry, name, version)


def release(registry, name: str, version: str) -> dict | None:
    """A release with its bundle per profile (sha256, size, chunk list), or None."""
    with registry.engine.connect() as db:
        head = db.execute(select(releases).where(releases.c.name == name).where(releases.c.version == version)).first()
        if head is None:
            return None
        parts = db.execute(select(release_bundles, bundles.c.size, bundles.c.chunk_bytes, bundles.c.chunks)
                           .join(bundles, bundles.c.sha256 == release_bundles.c.sha256)
                           .where(release_bundles.c.name == name).where(release_bundles.c.version == version)).all()
    return {"name": name, "version": version, "notes": head.notes, "created": head.created,
            "bundles": {p.profile: {"sha256": p.sha256, "size": p.size, "chunk_bytes": p.chunk_bytes,
                                    "chunks": p.chunks} for p in parts}}


def list_releases(registry) -> list[dict]:
    with registry.engine.connect() as db:
        heads = db.execute(select(releases).order_by(releases.c.name, releases.c.created)).all()
    return [release(registry, h.name, h.version) for h in heads]


def parse_release(text: str) -> tuple[str, str]:
    """``NAME@VERSION`` -> (name, version), with a one-line error otherwise."""
    name, at, version = text.partition("@")
    if not at or not name or not version:
        raise UsageError(f"{text!r}: give the release as NAME@VERSION (see 'edgepack fleet release list')")
    return name, version
