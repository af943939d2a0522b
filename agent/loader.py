"""The one path from a bundle file to a loaded model, shared by install, the daemon, predict, bench and
over-the-air updates: open → verify → profile check → extract (or check the extracted copy) → load →
smoke test. A failure at any step raises an EdgepackError with the reason, and nothing stays loaded.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.bundle import open_bundle
from edgepack.bundle.format import sha256_file
from edgepack.errors import StoreError

from .model import LoadedModel, load_model, release_freed_memory, smoke_test


def check_profile(manifest: dict, profile: str | None) -> None:
    """Refuse a bundle built for another device profile (``profile`` None: this device did not say)."""
    if profile and manifest["profile"] != profile:
        raise StoreError(
            f"bundle is built for profile {manifest['profile']!r} but this device is {profile!r}; "
            "convert the model for this profile"
        )


def check_extracted(manifest: dict, folder: Path) -> None:
    """The extracted model file is what gets loaded: check it has not rotted or been replaced."""
    model_file = manifest["model_file"]
    on_disk = Path(folder) / model_file
    try:
        actual = sha256_file(on_disk)
    except OSError:
        raise StoreError(f"the extracted model file {model_file} is missing; reinstall or roll back") from None
    if actual != manifest["files"][model_file]["sha256"]:
        raise StoreError(f"the extracted model file {model_file} is corrupted; reinstall or roll back")


def load_bundle(path: Path, folder: Path, *, keys=None, profile: str | None = None, threads: int | None = None,
                instances: int = 1, extracted: bool = False, smoke: bool = True) -> LoadedModel:
    """Open and verify the bundle at ``path`` (signed by one of ``keys`` when given), check it is for
    ``profile``, extract it into ``folder`` (or, with ``extracted``, check the copy already there),
    load it and run its smoke test. The caller owns ``folder`` and closes the model."""
    with open_bundle(path, public_keys=keys, verify_files=not extracted) as bundle:
        manifest = bundle.manifest
        check_profile(manifest, profile)
        if extracted:
            check_extracted(manifest, folder)
        else:
            bundle.extract_to(folder)
        model = load_model(Path(folder), manifest, threads, instances)
        try:
            if smoke:
                smoke_test(model, bundle)
        except BaseException:
            model.close()
            raise
    release_freed_memory()
    return model
