"""The slot operations of the model store, one verb each: ``install`` (a local bundle file, committed
at once), ``stage`` / ``stage_download`` (verify, extract, load and smoke-test into the inactive slot),
``switch`` (the staged slot becomes active: probation), ``reactivate`` (the intact bundle already in
the other slot), ``commit``, ``regress`` (roll back after a failed probation), ``stop_probation`` (a
clean stop: roll back, keep the new slot), ``rollback`` (manual) and ``cancel_download``.

Each is a sequence of lifecycle transitions (:mod:`.lifecycle`) written durably before its side
effect; a rollback never gives up halfway (a restart finishes it). Mixed into
:class:`agent.store.ModelStore`, which owns the lock, the state files and recovery.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from edgepack.atomic import copy_durably, fsync_dir, fsync_tree
from edgepack.bundle import open_bundle
from edgepack.bundle.format import sha256_file
from edgepack.errors import EdgepackError, StoreError, first_line

from ..loader import check_profile, load_bundle
from .lifecycle import UpdateState

SLOTS = ("a", "b")


class SlotOperations:
    """The update verbs of :class:`agent.store.ModelStore` (see the module docstring)."""

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
                        slot=previous, staged=info, pointers={"local": None})
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
            # Still rolling back (a restart, or a retry after a failed write): finish it.
            state = self.transition(name, "restart", reason)
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

