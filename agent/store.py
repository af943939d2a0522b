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
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from edgepack.atomic import write_json_atomic
from edgepack.bundle import open_bundle
from edgepack.bundle.format import sha256_file
from edgepack.errors import EdgepackError, StoreError, UsageError

from .loader import load_bundle
from .model import LoadedModel
from .updates import lifecycle
from .updates.lifecycle import UpdateState
from .updates.slots import SLOTS, SlotOperations
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


class ModelStore(SlotOperations):
    """The slots and state of every model in one store folder (the slot operations, one verb each, are
    :class:`agent.updates.slots.SlotOperations`)."""

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
