"""The model store: A/B slots per model on disk, switched atomically.

Layout under the store folder::

    models/<name>/state.json        which slot is active, which one was active before
    models/<name>/slots/a|b/        bundle.edgepack and its verified, extracted files

A new bundle is written into the inactive slot, verified, loaded and smoke-tested before
``state.json`` is replaced (temp file, fsync, rename), so a crash at any point leaves the old model
active or the new one committed, never a half-installed one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from edgepack.atomic import write_json_atomic
from edgepack.bundle import open_bundle
from edgepack.errors import EdgepackError, StoreError, UsageError

from .loader import check_profile, load_bundle
from .model import LoadedModel

SLOTS = ("a", "b")
STORE_ENV = "EDGEPACK_STORE"


def default_store() -> Path:
    """``$EDGEPACK_STORE``, else a per-user data folder."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    from platformdirs import user_data_dir

    return Path(user_data_dir("edgepack")) / "store"


class ModelStore:
    """The slots and state of every model in one store folder."""

    def __init__(self, root: Path | None = None, trusted_keys=None, profile: str | None = None):
        self.root = Path(root) if root else default_store()
        self.trusted_keys = trusted_keys or None
        self.profile = profile

    # -- reading -----------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        folder = self.root / "models"
        return sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file()) if folder.is_dir() else []

    def state(self, name: str) -> dict:
        path = self.root / "models" / name / "state.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {"active": None, "previous": None, "slots": {}}
        except (OSError, ValueError) as exc:
            raise StoreError(f"store state {path} is unreadable ({exc}); reinstall the model") from None

    def slot_dir(self, name: str, slot: str) -> Path:
        return self.root / "models" / name / "slots" / slot

    def slot_health(self, name: str, slot: str) -> str:
        """"ok" when the slot's bundle verifies and its extracted files match their hashes, else why not."""
        folder = self.slot_dir(name, slot)
        try:
            with open_bundle(folder / "bundle.edgepack", public_keys=self.trusted_keys, verify_files=True) as bundle:
                for member, entry in bundle.manifest["files"].items():
                    on_disk = folder / "files" / member
                    if not on_disk.is_file():
                        return f"missing extracted file {member}"
                    if hashlib.sha256(on_disk.read_bytes()).hexdigest() != entry["sha256"]:
                        return f"extracted file {member} is corrupted"
        except EdgepackError as exc:
            return exc.message
        return "ok"

    def resolve_name(self, name: str | None) -> str:
        """The model to use: ``name``, or the only installed model."""
        names = self.model_names()
        if name:
            if name not in names:
                raise UsageError(f"no model {name!r} in the store {self.root}; installed: {', '.join(names) or 'none'}")
            return name
        if not names:
            raise UsageError(f"the store {self.root} holds no model; run 'edgepack-agent install BUNDLE' or pass --bundle")
        if len(names) > 1:
            raise UsageError(f"the store holds several models ({', '.join(names)}); choose one with --model")
        return names[0]

    def load_active(self, name: str, threads: int | None = None, smoke: bool = False, instances: int = 1) -> LoadedModel:
        """Load the active slot of model ``name`` (and run its smoke test when ``smoke``)."""
        state = self.state(name)
        if not state.get("active"):
            raise StoreError(f"model {name!r} has no active slot")
        folder = self.slot_dir(name, state["active"])
        try:
            return load_bundle(folder / "bundle.edgepack", folder / "files", keys=self.trusted_keys, threads=threads,
                               instances=instances, extracted=True, smoke=smoke)
        except StoreError as exc:
            raise StoreError(f"slot {state['active']} of {name!r}: {exc.message}") from None

    # -- changing ----------------------------------------------------------------------------------

    def install(self, bundle_path: Path, threads: int | None = None) -> dict:
        """Verify, stage, load and smoke-test a bundle, then make it active; return the new state."""
        with open_bundle(bundle_path, public_keys=self.trusted_keys, verify_files=False) as bundle:
            # The manifest is signature-checked here; its files are checked when the staged copy loads.
            check_profile(bundle.manifest, self.profile)
            name = bundle.manifest["name"]
        state = self.state(name)
        active = state.get("active")
        slot = next(s for s in SLOTS if s != active)
        folder = self.slot_dir(name, slot)
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir(parents=True)
            shutil.copyfile(bundle_path, folder / "bundle.edgepack")
            # The copy is what stays: verify, profile-check, extract, load and smoke-test that.
            model = load_bundle(folder / "bundle.edgepack", folder / "files", keys=self.trusted_keys,
                                profile=self.profile, threads=threads)
            model.close()
            with open_bundle(folder / "bundle.edgepack", public_keys=self.trusted_keys, verify_files=False) as bundle:
                manifest, manifest_bytes = bundle.manifest, bundle.manifest_bytes
            if manifest["name"] != name:  # the file changed while it was being copied
                raise StoreError(f"{bundle_path} changed during the install; install it again")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        slots = dict(state.get("slots", {}))
        slots[slot] = {"version": manifest["version"], "profile": manifest["profile"],
                       "precision": manifest["precision"], "installed_at": int(time.time()),
                       "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}
        new_state = {"name": name, "active": slot, "previous": active, "slots": slots}
        write_json_atomic(self.root / "models" / name / "state.json", new_state)
        return new_state

    def rollback(self, name: str) -> dict:
        """Make the previous slot active again (it is verified first); return the new state."""
        state = self.state(name)
        previous = state.get("previous")
        if not previous or previous not in state.get("slots", {}):
            raise StoreError(f"model {name!r} has no previous version to roll back to")
        folder = self.slot_dir(name, previous)
        with open_bundle(folder / "bundle.edgepack", public_keys=self.trusted_keys, verify_files=True) as bundle:
            if self.slot_health(name, previous) != "ok":
                # The bundle itself verified: rebuild the extracted copy from it rather than refuse.
                fresh = folder / "files.new"
                shutil.rmtree(fresh, ignore_errors=True)
                bundle.extract_to(fresh)
                shutil.rmtree(folder / "files", ignore_errors=True)
                os.replace(fresh, folder / "files")
        new_state = {**state, "active": previous, "previous": state["active"]}
        write_json_atomic(self.root / "models" / name / "state.json", new_state)
        return new_state
