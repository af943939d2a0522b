"""The model store: A/B slots per model on disk, changed only through the update lifecycle.

Layout under the store folder::

    .lock                           held (flock) by whoever changes the store
    models/<name>/state.json        slots, active and previous slot, the update record (agent.lifecycle)
    models/<name>/staging/          a bundle being verified, extracted and smoke-tested
    models/<name>/slots/a|b/        bundle.edgepack and its verified, extracted files
    downloads/                      bundles arriving over the air (agent.updates)

Every change is a lifecycle transition written durably before its side effect, so a crash anywhere
resumes (:meth:`ModelStore.recover`) to the old model active or the new one committed. The
rollback target (the previous slot) is never touched until a new version has been fully staged, and a
failed or interrupted install leaves it as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from edgepack.atomic import copy_durably, fsync_dir, fsync_tree, write_json_atomic
from edgepack.bundle import open_bundle
from edgepack.bundle.format import sha256_file
from edgepack.errors import EdgepackError, StoreError, UsageError, first_line

from .updates import lifecycle
from .updates.lifecycle import UpdateState
from .loader import check_profile, load_bundle
from .model import LoadedModel

SLOTS = ("a", "b")
STORE_ENV = "EDGEPACK_STORE"
#: how long a command waits for another one changing the same store ($EDGEPACK_LOCK_WAIT_S overrides:
#: a slow SD card may need longer, the fault tests shorter)
LOCK_WAIT_S = float(os.environ.get("EDGEPACK_LOCK_WAIT_S", "30"))

#: called after every persisted transition with (model name, history entry, new state)
Listener = Callable[[str, dict, dict], None]


class StoreBusy(StoreError):
    """Another process holds the store's lock (an install or update); nothing was changed. Transient:
    the same step can be tried again once that process is done."""


def default_store() -> Path:
    """``$EDGEPACK_STORE``, else a per-user data folder."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    from platformdirs import user_data_dir

    return Path(user_data_dir("edgepack")) / "store"


def _empty_state(name: str) -> dict:
    return {"schema": lifecycle.SCHEMA, "name": name, "active": None, "previous": None, "slots": {},
            "update": lifecycle.idle_record()}


class ModelStore:
    """The slots and state of every model in one store folder."""

    Busy = StoreBusy

    def __init__(self, root: Path | None = None, trusted_keys=None, profile: str | None = None):
        self.root = Path(root) if root else default_store()
        self.trusted_keys = trusted_keys or None
        self.profile = profile
        self.listeners: list[Listener] = []
        self._lock_depth = 0
        self._lock_handle = None

    # -- reading -----------------------------------------------------------------------------------

    def model_names(self, with_empty: bool = False) -> list[str]:
        """Models with an active version (``with_empty``: every model folder with a state file)."""
        folder = self.root / "models"
        if not folder.is_dir():
            return []
        names = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
        return names if with_empty else [n for n in names if self._active_or_busy(n)]

    def _active_or_busy(self, name: str) -> bool:
        try:
            state = self.state(name)
        except StoreError:
            return True  # reported where it is used
        return bool(state.get("active"))

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def state(self, name: str) -> dict:
        """The model's state.json (an empty state when it was never installed)."""
        path = self.model_dir(name) / "state.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return _empty_state(name)
        except (OSError, ValueError) as exc:
            raise StoreError(f"store state {path} is unreadable ({exc}); reinstall the model") from None
        if not isinstance(state, dict):
            raise StoreError(f"store state {path} is not a JSON object; reinstall the model")
        schema = state.get("schema", 1)
        if schema > lifecycle.SCHEMA:
            raise StoreError(f"store state {path} has schema {schema}, newer than this agent reads "
                             f"({lifecycle.SCHEMA}); upgrade edgepack")
        if schema < 2:  # the pointer file of edgepack 0.1: no update record yet
            state = {**_empty_state(name), **state, "schema": lifecycle.SCHEMA}
        return state

    def slot_dir(self, name: str, slot: str) -> Path:
        return self.model_dir(name) / "slots" / slot

    def slot_health(self, name: str, slot: str) -> str:
        """"ok" when the slot's bundle verifies and its extracted files match their hashes, else why not."""
        folder = self.slot_dir(name, slot)
        try:
            with open_bundle(folder / "bundle.edgepack", public_keys=self.trusted_keys, verify_files=True) as bundle:
                for member, entry in bundle.manifest["files"].items():
                    on_disk = folder / "files" / member
                    if not on_disk.is_file():
                        return f"missing extracted file {member}"
                    if sha256_file(on_disk) != entry["sha256"]:
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
        return self._load_slot(name, state["active"], threads, smoke, instances)

    def _load_slot(self, name: str, slot: str, threads=None, smoke=True, instances: int = 1) -> LoadedModel:
        folder = self.slot_dir(name, slot)
        try:
            return load_bundle(folder / "bundle.edgepack", folder / "files", keys=self.trusted_keys, threads=threads,
                               instances=instances, extracted=True, smoke=smoke)
        except StoreError as exc:
            raise StoreError(f"slot {slot} of {name!r}: {exc.message}") from None

    # -- the lock and the lifecycle ----------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, wait_s: float | None = None):
        """Hold the store's lock (re-entrant in this object); another holder makes this wait, then fail."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "a+")
        deadline = time.monotonic() + (LOCK_WAIT_S if wait_s is None else wait_s)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise StoreBusy(f"another install or update is changing the store {self.root}; "
                                     "try again when it has finished") from None
                time.sleep(0.05)
        self._lock_depth, self._lock_handle = 1, handle
        try:
            yield
        finally:
            self._lock_depth, self._lock_handle = 0, None
            handle.close()  # releases the flock

    def transition(self, name: str, event: str, reason: str | None = None, *, pointers: dict | None = None,
                   **fields) -> dict:
        """Apply lifecycle ``event`` to model ``name``, persist the state durably, tell the listeners,
        and return the new state. ``pointers`` updates active/previous/slots in the same write."""
        state = self.state(name)
        update = lifecycle.step(state["update"], event, reason, **fields)
        new_state = {**state, **(pointers or {}), "schema": lifecycle.SCHEMA, "name": name, "update": update}
        write_json_atomic(self.model_dir(name) / "state.json", new_state)
        entry = update["history"][-1]
        for listener in list(self.listeners):
            try:
                listener(name, entry, new_state)
            except Exception:  # noqa: BLE001 - a listener (telemetry) never breaks the lifecycle
                pass
        return new_state

    def busy(self, name: str) -> str | None:
        """The update state of ``name`` when an update is under way, else None."""
        state = self.state(name)["update"]["state"]
        return None if state == UpdateState.IDLE.value else state

    @contextlib.contextmanager
    def daemon_lock(self):
        """Held by a daemon for its whole life: while it runs, the updates in progress are its own, and
        other processes must not 'recover' them (a state of probation is not a crash then)."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".daemon.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(f"another edgepack-agent daemon serves the store {self.root}; stop it first or "
                             "give this one another store") from None
        try:
            yield
        finally:
            handle.close()

    def daemon_running(self) -> bool:
        """Whether a daemon holds this store's daemon lock (checked without taking it for long)."""
        path = self.root / ".daemon.lock"
        if not path.exists():
            return False
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def recover(self, resume_downloads: bool = False) -> list[str]:
        """Finish or undo what a crash interrupted, for every model, and remove leftovers; return the
        names of the models that needed it. Downloads resume when ``resume_downloads`` (a daemon with
        updates on), else they are cancelled. Only for the process that owns the store's updates: the
        daemon (holding :meth:`daemon_lock`), or a command when no daemon runs."""
        touched = []
        self._resume_downloads = resume_downloads
        with self.locked():
            for name in self.model_names(with_empty=True):
                try:
                    state = self.state(name)
                except StoreError:
                    continue
                event = lifecycle.recovery_event(state["update"])
                if event:
                    touched.append(name)
                    self._resume(name, state, event)
                self._clean(name)
        return touched

    def recover_model(self, name: str) -> bool:
        """Under the lock: finish or undo an update of ``name`` that no process is running any more (an
        install killed while staging); True when there was one. Downloads and probations are the
        daemon's own and are left alone."""
        with self.locked():
            state = self.state(name)
            if state["update"]["state"] in (UpdateState.STAGING.value, UpdateState.SWITCHING.value,
                                            UpdateState.ROLLING_BACK.value):
                self._resume(name, state, "restart")
                self._clean(name)
                return True
        return False

    def _resume(self, name: str, state: dict, event: str) -> None:
        current = UpdateState(state["update"]["state"])
        if current is UpdateState.DOWNLOADING:
            if getattr(self, "_resume_downloads", False):
                self.transition(name, event, "the agent restarted; the download resumes")
            else:
                self.transition(name, "cancel", "no updater runs to finish the download")
        elif current in (UpdateState.STAGING, UpdateState.SWITCHING):
            # The old model is still the active one; the half-staged copy is a leftover.
            self.transition(name, event, f"the agent restarted during {current.value}; the old version stays active")
        elif current is UpdateState.PROBATION:
            # A crash while the new version serves may be the new version's fault: roll back.
            self._roll_back(name, "the agent restarted during probation", event)
        elif current is UpdateState.ROLLING_BACK:
            self._roll_back(name, state["update"].get("reason") or "rollback interrupted", event)

    def _clean(self, name: str) -> None:
        """Remove a staging folder no update is using and slots no pointer names."""
        state = self.state(name)
        folder = self.model_dir(name)
        if state["update"]["state"] != UpdateState.STAGING.value:
            shutil.rmtree(folder / "staging", ignore_errors=True)
        keep = {state.get("active"), state.get("previous")}
        if state["update"]["state"] == UpdateState.SWITCHING.value:
            keep.add(state["update"].get("slot"))
        for slot in SLOTS:
            if slot not in keep and self.slot_dir(name, slot).exists():
                shutil.rmtree(self.slot_dir(name, slot), ignore_errors=True)
        for leftover in folder.glob(".state.json.*.tmp"):
            leftover.unlink(missing_ok=True)

    # -- installing --------------------------------------------------------------------------------

    def install(self, bundle_path: Path, threads: int | None = None) -> dict:
        """Verify, stage, load and smoke-test a bundle file, then make it active; return the new state.

        Local installs commit at once (this process loaded and smoke-tested the staged copy); over the
        air the daemon stages with :meth:`stage` and commits after a probation window."""
        with open_bundle(bundle_path, public_keys=self.trusted_keys, verify_files=False) as bundle:
            # The manifest is signature-checked here; the files are checked when the staged copy loads.
            check_profile(bundle.manifest, self.profile)
            name = bundle.manifest["name"]
        with self.locked():
            self._cancel_download_for_local(name, "install")
            self._refuse_busy(name)
            self.transition(name, "install", target={"source": str(bundle_path)})
            self.stage(name, bundle_path, threads)
            return self.transition(name, "commit", pointers={**self._switched_pointers(name),
                                                             "local": {"action": "install", "at": time.time()}})

    def _cancel_download_for_local(self, name: str, action: str) -> None:
        """A local install or rollback takes precedence over a download in progress (DESIGN: the
        operator's command is the emergency brake); the fleet's next newer desired state wins again."""
        if self.busy(name) == UpdateState.DOWNLOADING.value:
            self.transition(name, "cancel", f"a local {action} replaced the download")

    def cancel_download(self, name: str, reason: str) -> dict:
        """End a download in progress (a newer desired state replaced it)."""
        return self.transition(name, "cancel", reason)

    def stage_download(self, name: str, bundle_path: Path, threads: int | None = None) -> dict:
        """Over the air, with the lock held: the download is complete and verified; stage it (verify,
        extract, load, smoke-test), switch to it and enter probation, in one hold of the lock so no
        other process sees a half-made state it could take for a leftover."""
        self.transition(name, "downloaded")
        self.stage(name, bundle_path, threads)
        return self.switch(name)

    def reactivate(self, name: str, target: dict) -> bool:
        """When the inactive slot holds ``target``'s bundle intact (a probation ended by a clean stop),
        switch to it and enter probation again without a download; False when it does not."""
        state = self.state(name)
        previous = state.get("previous")
        info = state.get("slots", {}).get(previous or "")
        if state["update"]["state"] != UpdateState.IDLE.value or not info or info.get("bundle_sha256") != target["sha256"]:
            return False
        if self.slot_health(name, previous) != "ok":
            return False
        self.transition(name, "reactivate", "the new version is in the other slot already", target=target,
                        slot=previous, staged=info)
        self.switch(name)
        return True

    def stop_probation(self, name: str, reason: str) -> dict:
        """A clean stop during probation: the old version is active again and the new one stays in the
        other slot (reactivated at the next start, see :meth:`reactivate`)."""
        return self._roll_back(name, reason, "regressed", keep=True)

    def _refuse_busy(self, name: str) -> None:
        busy = self.busy(name)
        if busy:
            raise StoreError(f"an update of {name!r} is under way ({busy}); wait for it to finish "
                             "(edgepack-agent status shows it)")

    def stage(self, name: str, bundle_path: Path, threads: int | None = None) -> dict:
        """In state ``staging``: copy, verify, extract, load and smoke-test ``bundle_path`` in the
        staging folder, fsync it, then (state ``switching``) move it into the inactive slot. A failure
        removes the staged copy, records ``fail`` and raises; the active and previous slots are as before."""
        staging = self.model_dir(name) / "staging"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            copy_durably(bundle_path, staging / "bundle.edgepack")
            # The copy is what stays: verify, profile-check, extract, load and smoke-test that.
            model = load_bundle(staging / "bundle.edgepack", staging / "files", keys=self.trusted_keys,
                                profile=self.profile, threads=threads)
            sample_seconds = model.sample_seconds
            model.close()
            with open_bundle(staging / "bundle.edgepack", public_keys=self.trusted_keys, verify_files=False) as bundle:
                manifest, manifest_bytes = bundle.manifest, bundle.manifest_bytes
            if manifest["name"] != name:  # the file changed while it was being copied
                raise StoreError(f"{bundle_path} changed during the install; install it again")
            fsync_tree(staging)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            reason = exc.message if isinstance(exc, EdgepackError) else first_line(exc)
            self.transition(name, "fail", reason)
            raise
        state = self.state(name)
        slot = next(s for s in SLOTS if s != state.get("active"))
        info = {"version": manifest["version"], "profile": manifest["profile"], "precision": manifest["precision"],
                "installed_at": int(time.time()), "sample_seconds": sample_seconds,
                "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                "bundle_sha256": sha256_file(staging / "bundle.edgepack")}
        # The inactive slot is the rollback target until now; from this write on it is being replaced.
        previous = state.get("previous")
        pointers = {"previous": None if previous == slot else previous,
                    "slots": {k: v for k, v in state.get("slots", {}).items() if k != slot}}
        self.transition(name, "staged", pointers=pointers, slot=slot, staged=info)
        target = self.slot_dir(name, slot)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
        fsync_dir(target.parent)
        return info

    def _switched_pointers(self, name: str) -> dict:
        """active/previous/slots once the staged slot becomes active (state ``switching``)."""
        state = self.state(name)
        update = state["update"]
        slot = update["slot"]
        return {"active": slot, "previous": state.get("active"),
                "slots": {**state.get("slots", {}), slot: update["staged"]}}

    def switch(self, name: str, reason: str | None = None) -> dict:
        """Over the air: make the staged slot active and enter probation (the daemon then loads it)."""
        return self.transition(name, "switched", reason, pointers=self._switched_pointers(name))

    def commit(self, name: str, reason: str | None = None) -> dict:
        """End probation: the new version stays; the old one stays in the other slot for manual rollback."""
        return self.transition(name, "commit", reason)

    def regress(self, name: str, reason: str) -> dict:
        """End probation by rolling back to the previous version; the new slot is removed."""
        return self._roll_back(name, reason, "regressed")

    def _roll_back(self, name: str, reason: str, event: str, keep: bool = False) -> dict:
        state = self.state(name)
        failed_slot = state["update"].get("slot")
        if UpdateState(state["update"]["state"]) is not UpdateState.ROLLING_BACK:
            old = state.get("previous")
            kept = {old, failed_slot} if keep else {old}
            pointers = {"active": old, "previous": failed_slot if keep else None,
                        "slots": {k: v for k, v in state.get("slots", {}).items() if k in kept}}
            state = self.transition(name, event, reason, pointers=pointers, stopped=keep)
        else:
            state = self.transition(name, event, reason)  # restart: still rolling back
            keep = bool(state["update"].get("stopped"))
        if keep:
            return self.transition(name, "rolled_back", reason)
        if failed_slot and failed_slot != state.get("active"):
            shutil.rmtree(self.slot_dir(name, failed_slot), ignore_errors=True)
            fsync_dir(self.slot_dir(name, failed_slot).parent)
        return self.transition(name, "rolled_back", reason)

    # -- manual rollback ---------------------------------------------------------------------------

    def rollback(self, name: str, threads: int | None = None) -> dict:
        """Make the previous slot active again after loading and smoke-testing it; return the new state."""
        with self.locked():
            self._cancel_download_for_local(name, "rollback")
            self._refuse_busy(name)
            state = self.state(name)
            previous = state.get("previous")
            if not previous or previous not in state.get("slots", {}):
                raise StoreError(f"model {name!r} has no previous version to roll back to")
            folder = self.slot_dir(name, previous)
            if self.slot_health(name, previous) != "ok":
                # Rebuild the extracted copy from the bundle (which must verify) rather than refuse.
                with open_bundle(folder / "bundle.edgepack", public_keys=self.trusted_keys, verify_files=True) as bundle:
                    fresh = folder / "files.new"
                    shutil.rmtree(fresh, ignore_errors=True)
                    bundle.extract_to(fresh)
                    fsync_tree(fresh)
                shutil.rmtree(folder / "files", ignore_errors=True)
                os.replace(fresh, folder / "files")
                fsync_dir(folder)
            self._load_slot(name, previous, threads, smoke=True).close()
            return self.transition(name, "rollback", "manual rollback",
                                   pointers={"active": previous, "previous": state["active"],
                                             "local": {"action": "rollback", "at": time.time()}})

