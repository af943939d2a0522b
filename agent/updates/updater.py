"""Model updates over MQTT: signed desired state -> download -> the store's install path -> probation
-> commit or automatic rollback.

Runs on the daemon's event loop; disk work runs on one worker thread, in order. Every step is a
transition of the store's persisted lifecycle (:mod:`.lifecycle`), so a restart resumes it; what this
module keeps besides is the record of :mod:`.record`.

Failures are typed (:mod:`.errors`): a transient one (disk full, the store held by another process)
backs off and tries again without counting against the target; a fatal one records the target as
failed. Commit and rollback are obligations: retried until done, never given up halfway.

Precedence: an operator's local ``edgepack-agent install`` or ``rollback`` holds until the fleet
sends a desired state newer than that local action (it also cancels a download in progress).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from edgepack.errors import EdgepackError, StoreError, first_line
from edgepack.fleet import chunks as chunk_frames
from edgepack.fleet import topics
from edgepack.fleet.desired import DesiredStateError

from . import record as records
from .download import BadChunk, Download, remove_leftovers
from .errors import FatalUpdateError, TransientUpdateError
from .http_source import HttpSource, SourceFailed, runs
from .probation import COMMIT, ROLL_BACK, Budget, judge

log = logging.getLogger("edgepack.agent.updates")

Emit = Callable[[str, dict], None]
#: failures worth another try (a download that ran out of time, a crash while staging): this many in all
RETRYABLE = {"timeout", "restart"}
ATTEMPTS = 3
#: backoff of transient failures, seconds (doubled each time, with jitter)
BACKOFF_MIN_S, BACKOFF_MAX_S = 1.0, 300.0
#: obligations (commit, rollback) are retried at most this far apart
OBLIGATION_MAX_S = 30.0


class _FromShadow(Exception):
    """The bundle is the shadow's file already: the download steps are skipped."""


class _Superseded(Exception):
    """The download's target is no longer wanted (a newer desired state, or a local install)."""


class Updater:
    """Takes desired states from the fleet and drives each accepted one through the lifecycle."""

    def __init__(self, config, registry, device_id: str, publish: Callable[[str, bytes], int | None], emit: Emit,
                 fleet_keys):
        self.config = config
        self.options = config.updates
        self.registry = registry
        self.store = registry.store
        self.device_id = device_id
        self.publish = publish
        self.emit = emit
        self.keys = fleet_keys
        self.blocked: str | None = None
        self.record = self._load_record()
        #: name -> progress of the download under way (events, telemetry, status)
        self.progress: dict[str, dict] = {}
        self._held: dict[str, bytes] = {}  # topic -> a desired state refused while the record was blocked
        self._wake = asyncio.Event()
        self._frames: asyncio.Queue = asyncio.Queue(maxsize=256)
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-disk")
        #: HTTP(S) downloads block on their socket here, never on the event loop or the disk worker
        self._http = ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-http")
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        #: set when a reconnect came without the broker's session: chunks asked before are lost
        self.session_lost = False
        self._clock_warned = False
        self._stale_reported: set = set()
        #: called when what the retained state shows changed outside a transition (download progress,
        #: the version the daemon serves); the fleet link publishes the state then
        self.state_changed: Callable[[], None] = lambda: None

    # -- the persisted record ----------------------------------------------------------------------

    def _load_record(self) -> dict:
        try:
            record = records.read_record(self.store.root)
            self.blocked = None
            return record
        except records.RecordCorrupt as exc:
            if self.blocked != str(exc):
                log.error("update record corrupt", extra={"error": str(exc)})
                self.emit("update_record_corrupt", {"message": str(exc)})
            self.blocked = str(exc)
            return records.empty_record()

    def _save_record(self) -> None:
        records.save_record(self.store.root, self.record)

    def _check_unblocked(self) -> None:
        """Re-read a corrupt record (an operator may have reset it); take held desired states then."""
        self.record = self._load_record()
        if not self.blocked:
            log.info("update record readable again; updates resume")
            held, self._held = self._held, {}
            for topic, payload in held.items():
                self.handle_desired(topic, payload)

    # -- messages from the fleet (called on the event loop) ----------------------------------------

    def topics(self) -> list[str]:
        return [topics.desired(self.device_id)] + [topics.group_desired(g) for g in self.options.groups] + [
            topics.chunk_data(self.device_id)]

    def handle_desired(self, topic: str, payload: bytes) -> None:
        """Check a desired state and, when it is new and valid, make it the wanted one (persisted)."""
        if not payload:
            return  # a cleared retained message
        if self.blocked:
            self._held[topic] = payload
            self.emit("desired_refused", {"reason": "record-corrupt", "message": self.blocked, "topic": topic})
            return
        try:
            checked = records.check_desired(self.record, topic, payload, device=self.device_id,
                                            groups=self.options.groups, keys=self.keys, profile=self.config.profile)
        except DesiredStateError as exc:
            log.warning("desired state refused", extra={"reason": exc.reason, "error": exc.message, "topic": topic})
            self.emit("desired_refused", {"reason": exc.reason, "message": exc.message, "topic": topic})
            return
        if checked is None:
            return
        _, behind = records.clock_now(self.record)
        if behind and not self._clock_warned:
            self._clock_warned = True
            log.warning("device clock behind", extra={"floor": self.record["clock"], "now": time.time()})
            self.emit("clock_behind", {"message": "this device's clock is behind the newest signed desired state; "
                                       "expiry is judged by that state's issue time until the clock is set"})
        state, bundle = checked
        target = records.accept(self.record, topic, state, bundle)
        self._save_record()
        public = {k: v for k, v in target.items() if k != "chunks"}
        self.emit("desired_accepted", public)
        log.info("desired state accepted", extra={"model": target["name"], "version": target["version"],
                                                  "sha256": target["sha256"], "desired_version": state.version})
        self._wake.set()

    def handle_chunk(self, payload: bytes) -> None:
        if len(payload) > chunk_frames.CHUNK_BYTES + chunk_frames.MAX_HEADER + 8:
            self.emit("chunk_refused", {"message": f"a chunk message of {len(payload)} bytes is larger than any chunk"})
            return
        try:
            self._frames.put_nowait(payload)
        except asyncio.QueueFull:
            pass  # more than the window asked for: dropped, asked again on time-out

    # -- start and stop ----------------------------------------------------------------------------

    def start(self) -> None:
        for name, target in self.record["wanted"].items():
            try:
                update = self.store.state(name)["update"]
            except EdgepackError as exc:
                log.error("model state unreadable", extra={"model": name, "error": exc.message})
                continue
            if (update.get("target") or {}).get("sha256") != target["sha256"] or target["sha256"] in self.record["failed"]:
                continue
            if update.get("result") == "rolled_back" and not update.get("stopped"):
                # Rolled back after a crash during its probation while no updater watched: a failure.
                self._fail(target, "probation", update.get("reason") or "rolled back")
            elif update.get("result") == "interrupted":
                # The agent died during this update (a crash while loading it?): a few tries, then no
                # more, so a bundle that kills the process cannot make it boot-loop forever.
                self._fail(target, "restart", update.get("reason") or "interrupted")
        keep = {t["sha256"] for t in self.record["wanted"].values()}
        for name in self.store.model_names(with_empty=True):
            try:
                update = self.store.state(name)["update"]
                sha = (update.get("target") or {}).get("sha256")
                given_up = sha in self.record["failed"] and (self.record["failed"][sha].get("reason") not in RETRYABLE
                                                             or self.record["failed"][sha].get("attempts", 1) >= ATTEMPTS)
                if update["state"] == "downloading" and (sha not in keep or given_up):
                    # Nothing drives this download any more (killed between its failure and the
                    # transition, or its target is no longer wanted): end it.
                    with self.store.locked():
                        self.store.cancel_download(name, "no longer wanted")
            except EdgepackError as exc:
                log.error("could not end an orphan download", extra={"model": name, "error": exc.message})
        remove_leftovers(self.store.root / "downloads", self._wanted_shas())
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task:
            # Cancelled again until it ends: on Python 3.11 a cancellation that lands as an
            # asyncio.wait_for completes is swallowed (the task would go on, and this wait never end).
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=0.5)
            await asyncio.gather(self._task, return_exceptions=True)

        def end_probations() -> None:
            # Runs on the disk worker after whatever job was in flight (a staging that ends in
            # probation, a regress): a clean stop (SIGTERM, reboot) is not the new version's fault, so
            # the old one is active again and the new one stays in the other slot; its probation starts
            # again at the next start, without a download.
            for name in self.store.model_names(with_empty=True):
                try:
                    with self.store.locked():
                        if self.store.busy(name) == "probation":
                            self.store.stop_probation(name, "the agent stopped during probation")
                except Exception as exc:  # noqa: BLE001 - the stop must go on (offline state, spool)
                    log.error("could not end the probation at stop", extra={"model": name, "error": first_line(exc)})

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._disk, end_probations)
        await loop.run_in_executor(None, self._disk.shutdown, True)
        self._http.shutdown(wait=False)  # its download was aborted (socket shut) when the task was cancelled

    async def _disk_call(self, fn, *args, **kwargs):
        def locked():
            with self.store.locked():
                return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._disk, locked)

    async def _obligation(self, what: str, fn, *args) -> None:
        """Run a step that must happen (commit, rollback) until it succeeds: a store held by a CLI
        install, a full disk or an I/O error only delay it."""
        delay = BACKOFF_MIN_S
        while True:
            try:
                await self._disk_call(fn, *args)
                return
            except (StoreError, OSError) as exc:
                message = exc.message if isinstance(exc, EdgepackError) else first_line(exc)
                log.warning(f"{what} delayed", extra={"error": message, "retry_s": round(delay, 1)})
                self.emit("update_delayed", {"step": what, "message": message})
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, OBLIGATION_MAX_S)

    # -- the update loop ---------------------------------------------------------------------------

    def _next_target(self) -> dict | None:
        for name, target in sorted(self.record["wanted"].items()):
            if "chunks" not in target:
                continue  # accepted by an agent before signed chunk lists: the fleet must push it again
            failure = self.record["failed"].get(target["sha256"])
            if failure and (failure.get("reason") not in RETRYABLE or failure.get("attempts", 1) >= ATTEMPTS):
                continue
            state = self.store.state(name)
            active = state.get("active")
            if state["update"]["state"] in ("probation", "rolling_back"):
                return target  # an update left unfinished by an error: watch or finish it
            if active and state["slots"].get(active, {}).get("bundle_sha256") == target["sha256"]:
                if state["update"]["state"] == "downloading":
                    return target  # the fleet went back to what runs: the download under way must end
                continue  # already running it
            local = state.get("local") or {}
            if local.get("at", 0) > target.get("accepted_at", 0) and state["update"]["state"] == "idle":
                continue  # an operator's local install/rollback holds until a newer desired state
            return target
        return None

    async def _run(self) -> None:
        delay = BACKOFF_MIN_S
        last_reason = None
        while True:
            self._wake.clear()
            try:
                if self.blocked:
                    self._check_unblocked()
                    if self.blocked:
                        await self._pause(2.0)
                        continue
                target = self._next_target()
                if target is None:
                    change = self._next_shadow()
                    if change is None:
                        await self._wake.wait()
                    else:
                        await self._shadow(*change)
                    continue
                await self._update(target)
                delay, last_reason = BACKOFF_MIN_S, None
            except asyncio.CancelledError:
                raise
            except TransientUpdateError as exc:
                if exc.reason != last_reason:  # one event per kind of trouble, not one per retry
                    log.warning("update waits", extra={"reason": exc.reason, "error": exc.message, "retry_s": round(delay, 1)})
                    self.emit("update_waiting", {"reason": exc.reason, "message": exc.message})
                last_reason = exc.reason
                await self._pause(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX_S)
            except Exception as exc:  # noqa: BLE001 - the updater must survive anything; the model keeps serving
                log.exception("update failed")
                self.emit("update_error", {"message": first_line(exc)})
                await self._pause(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def _pause(self, seconds: float) -> None:
        """Sleep, or less when a new desired state arrives."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _fail(self, target: dict, reason: str, message: str) -> None:
        attempts = self.record["failed"].get(target["sha256"], {}).get("attempts", 0) + 1
        self.record["failed"][target["sha256"]] = {"reason": reason, "message": message, "at": time.time(),
                                                   "attempts": attempts}
        log.error("update failed", extra={"model": target["name"], "reason": reason, "error": message})
        try:
            self._save_record()
        except OSError as exc:  # a full disk: kept in memory, saved with the next change
            log.error("update record not saved", extra={"error": first_line(exc)})

    def _busy(self, exc: StoreError) -> TransientUpdateError:
        return TransientUpdateError("busy", exc.message)

    async def _update(self, target: dict) -> None:
        name = target["name"]
        update = self.store.state(name)["update"]
        current, ours = update["state"], (update.get("target") or {}).get("sha256") == target["sha256"]
        try:
            if current == "idle":
                if await self._disk_call(self.store.reactivate, name, target):
                    # The bundle is in the other slot already (a probation interrupted by a clean stop).
                    await self._probation(name, target, self._old_health(name))
                    return
                await self._disk_call(self.store.transition, name, "download", None, target=target,
                                      pointers={"local": None})
            elif current == "downloading" and not ours:  # a newer desired state replaced it
                old = update.get("target") or {}
                await self._disk_call(self.store.cancel_download, name, "a newer desired state replaced it")
                if old.get("sha256"):
                    remove_leftovers(self.store.root / "downloads", self._wanted_shas())
                state = self.store.state(name)
                if (state.get("active") and
                        state["slots"].get(state["active"], {}).get("bundle_sha256") == target["sha256"]):
                    log.info("download cancelled: the wanted version is the one serving",
                             extra={"model": name, "version": target["version"]})
                    self.state_changed()
                    return
                await self._disk_call(self.store.transition, name, "download", None, target=target)
            elif current == "probation" and ours:
                await self._probation(name, target, None)  # our own, interrupted by an error: watch again
                return
            elif current == "probation":
                # A probation left behind by an error, and a newer target wanted meanwhile: the old
                # version comes back first (not counted against the version on probation).
                await self._obligation("rollback", self.store.stop_probation, name, "a newer desired state replaced it")
                await self.registry.activate(name)
                return
            elif current != "downloading":
                # Another process (an edgepack-agent install) is changing this model, or died doing so:
                # finish or undo a leftover under the store lock, else wait for it with backoff.
                await self._disk_call(self.store.recover_model, name)
                raise TransientUpdateError("busy", f"another update of {name!r} was under way ({current})")
        except StoreError as exc:
            raise self._busy(exc) from None
        download = Download(self.store.root / "downloads", target["sha256"], target["size"], target["chunk_bytes"],
                            _digests(target))
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.options.download_timeout_s
        promoted = await loop.run_in_executor(self._disk, self._shadow_file, name, target["sha256"])
        try:
            if promoted is not None:
                # Promoted from shadow: the bundle ran beside the active version already; no download.
                log.info("bundle taken from the shadow", extra={"model": name, "version": target["version"]})
                self.emit("download_skipped", {"model": name, "version": target["version"], "reason": "shadow"})
                path = promoted
                raise _FromShadow()
            await loop.run_in_executor(self._disk, download.begin)
            if target.get("url") and self.options.http_sources and not download.complete:
                await self._download_http(download, target, deadline)
            await self._download(download, target, deadline)  # over MQTT: whatever is still missing
            path = await loop.run_in_executor(self._disk, download.verify)
        except _FromShadow:
            pass
        except _Superseded:
            return  # the next round starts what is wanted now
        except FatalUpdateError as exc:
            self._fail(target, exc.reason, exc.message)
            await self._obligation("fail", self.store.transition, name, "fail", exc.message)
            if exc.reason not in RETRYABLE:
                download.discard()
            return
        finally:
            self.progress.pop(name, None)
        old_health = self._old_health(name)
        try:
            await self._disk_call(self.store.stage_download, name, path, self.config.model(name).threads)
        except StoreError as exc:
            if isinstance(exc, self.store.Busy):
                raise self._busy(exc) from None
            self._fail(target, "install", exc.message)  # stage() recorded the failure transition
            download.discard()
            return
        except OSError as exc:  # a full disk while staging: the download stays, staging is tried again
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise TransientUpdateError("disk-full" if full else "disk", first_line(exc)) from None
        except Exception as exc:  # noqa: BLE001 - anything else staging raises is this bundle's failure
            self._fail(target, "install", exc.message if isinstance(exc, EdgepackError) else first_line(exc))
            download.discard()
            return
        download.discard()
        await self._probation(name, target, old_health)

    # -- a shadow candidate the fleet asks for ------------------------------------------------------

    def _wanted_shas(self) -> set[str]:
        """Bundles a download of which is kept: every wanted target's and its shadow's (a partial shadow
        download resumes after a restart like an update's)."""
        return ({t["sha256"] for t in self.record["wanted"].values()}
                | {t["shadow"]["sha256"] for t in self.record["wanted"].values() if t.get("shadow")})

    def _shadow_folder(self, name: str):
        return self.store.root / "shadow" / name

    def _shadow_file(self, name: str, sha256: str):
        """The shadow's bundle file of ``name`` when it is ``sha256`` (checked), else None."""
        from edgepack.bundle.format import sha256_file

        path = self._shadow_folder(name) / f"{sha256}.edgepack"
        try:
            return path if path.is_file() and sha256_file(path) == sha256 else None
        except OSError:
            return None

    def _given_up(self, sha256: str) -> bool:
        """Whether a failure recorded against ``sha256`` is final (the update loop's retry rule)."""
        failure = self.record["failed"].get(sha256)
        return bool(failure) and (failure.get("reason") not in RETRYABLE or failure.get("attempts", 1) >= ATTEMPTS)

    def _next_shadow(self) -> tuple[str, dict | None] | None:
        """A model whose running shadow differs from what its wanted target asks (one that failed here
        is not tried again until the fleet names another): (name, the wanted shadow or None)."""
        for name, target in sorted(self.record["wanted"].items()):
            want = target.get("shadow")
            if want and self._given_up(want["sha256"]):
                want = None
            scheduler = self.registry.get(name)
            if scheduler is None or scheduler.current is None or scheduler.current.version != target["version"]:
                continue  # not the version the shadow is to be compared with (an update first, or it failed)
            if (want or {}).get("sha256") != self.registry.fleet_shadow(name):
                return name, want
            if want is None and self._shadow_folder(name).exists():
                return name, None  # a shadow promoted (or failed) leaves its folder: removed
        return None

    async def _shadow(self, name: str, want: dict | None) -> None:
        """Start, replace or stop ``name``'s fleet shadow. Its bundle comes like an update's (signed
        chunk list, HTTP or MQTT) into ``<store>/shadow/<name>/``; a failure is recorded against that
        bundle and reported, and never touches what serves."""
        folder = self._shadow_folder(name)
        loop = asyncio.get_running_loop()
        if want is None:
            running = self.registry.fleet_shadow(name) is not None
            await self.registry.detach_shadow(name)
            await loop.run_in_executor(self._disk, shutil.rmtree, folder, True)
            # partial downloads of a shadow no longer wanted go too
            await loop.run_in_executor(self._disk, remove_leftovers, self.store.root / "downloads", self._wanted_shas())
            if running:
                self.emit("shadow_stopped", {"model": name})
                self.state_changed()
            return
        path = await loop.run_in_executor(self._disk, self._shadow_file, name, want["sha256"])
        if path is None:
            download = Download(self.store.root / "downloads", want["sha256"], want["size"], want["chunk_bytes"],
                                _digests(want))
            deadline = time.monotonic() + self.options.download_timeout_s
            check = lambda d, t, dl: self._check_shadow_wanted(name, want, dl)  # noqa: E731
            try:
                await loop.run_in_executor(self._disk, download.begin)
                if want.get("url") and self.options.http_sources and not download.complete:
                    await self._download_http(download, want, deadline, check)
                await self._download(download, want, deadline, check)
                part = await loop.run_in_executor(self._disk, download.verify)
            except _Superseded:
                return
            except FatalUpdateError as exc:
                if exc.reason not in RETRYABLE:
                    download.discard()  # a time-out keeps what came: the next try asks only for the rest
                self._shadow_failed(name, want, exc.reason, exc.message)
                return
            finally:
                self.progress.pop(name, None)

            def keep() -> Path:
                shutil.rmtree(folder, ignore_errors=True)  # the one before, if any
                folder.mkdir(parents=True, exist_ok=True)
                final = folder / f"{want['sha256']}.edgepack"
                os.replace(part, final)
                download.discard()
                return final

            path = await loop.run_in_executor(self._disk, keep)
        try:
            version = await self.registry.attach_shadow(name, path, want["sha256"], want.get("sample_rate"),
                                                        want.get("cpu_share"))
        except EdgepackError as exc:
            self._shadow_failed(name, want, "shadow", exc.message)
            return
        self.emit("shadow_started", {"model": name, "version": version, "sha256": want["sha256"]})
        self.state_changed()

    def _check_shadow_wanted(self, name: str, want: dict, deadline: float) -> None:
        wanted = (self.record["wanted"].get(name) or {}).get("shadow") or {}
        if wanted.get("sha256") != want["sha256"] or self._next_target() is not None:
            raise _Superseded()  # another shadow, none, or an update wanted first
        if time.monotonic() > deadline:
            raise FatalUpdateError("timeout", f"the shadow's download did not finish within "
                                   f"{self.options.download_timeout_s:g} s")

    def _shadow_failed(self, name: str, want: dict, reason: str, message: str) -> None:
        self._fail({**want, "name": name}, reason, message)
        self.emit("shadow_failed", {"model": name, "version": want["version"], "reason": reason, "message": message})
        self.state_changed()

    def shadow_failure(self, name: str) -> dict | None:
        """The final failure of the shadow ``name``'s wanted target names, if any (for the state: one
        that is tried again is not reported as failed)."""
        want = (self.record["wanted"].get(name) or {}).get("shadow")
        return self.record["failed"].get(want["sha256"]) if want and self._given_up(want["sha256"]) else None

    def _old_health(self, name: str) -> dict | None:
        scheduler = self.registry.schedulers.get(name)
        return scheduler.current.health.summary() if scheduler and scheduler.current else None

    def _check_wanted(self, download: Download, target: dict, deadline: float) -> None:
        """_Superseded when the target is no longer wanted; FatalUpdateError past the deadline."""
        name = target["name"]
        wanted = self.record["wanted"].get(name) or {}
        update = self.store.state(name)["update"]
        if (wanted.get("sha256") != target["sha256"] or update["state"] != "downloading"
                or (update.get("target") or {}).get("sha256") != target["sha256"]):
            raise _Superseded()
        if time.monotonic() > deadline:
            raise FatalUpdateError("timeout", f"the download did not finish within {self.options.download_timeout_s:g} s "
                                   f"({download.progress()['percent']}% received); it is tried again")

    def _report_progress(self, download: Download, target: dict, reported: int, via: str) -> int:
        """Progress for status and telemetry; an event each 10%. Returns the step reported."""
        name = target["name"]
        self.progress[name] = {"version": target["version"], **download.progress(), "via": via}
        step = int(self.progress[name]["percent"] // 10)
        if step != reported:
            self.emit("download_progress", {"model": name, **self.progress[name]})
            self.state_changed()
        return step

    async def _download_http(self, download: Download, target: dict, deadline: float, check=None) -> None:
        """Fetch the missing chunks from the target's signed HTTP(S) source, each checked against its
        signed digest. Returns when the file is complete, or when the source keeps failing (then the
        MQTT chunks bring the rest: what came over HTTP stays)."""
        loop = asyncio.get_running_loop()
        name, options = target["name"], self.options
        source = HttpSource(target["url"], options.http_timeout_s, options.http_ca_file, self.device_id)
        stop = threading.Event()

        def deliver(index: int, data: bytes) -> None:
            try:
                download.write(index, index * download.chunk_bytes, data)
            except BadChunk as exc:
                download.refused += 1
                raise SourceFailed(f"{source.url}: {exc}") from None

        def fetch_missing() -> None:
            for first, last in runs(download.missing()):
                if all(i in download.received for i in range(first, last + 1)):
                    continue  # brought by a whole-file answer to an earlier run
                whole = source.fetch(first, last, download.chunk_bytes, download.size, deliver, stop,
                                     wanted=lambda index: index not in download.received)
                if whole:
                    return  # the server sent the whole file: every missing chunk came with it

        failures, delay, reported = 0, BACKOFF_MIN_S, -1
        work = None
        try:
            while not download.complete:
                (check or self._check_wanted)(download, target, deadline)
                before = len(download.received)
                work = loop.run_in_executor(self._http, fetch_missing)
                try:
                    while True:
                        done, _ = await asyncio.wait({work}, timeout=1.0)
                        reported = self._report_progress(download, target, reported, "http")
                        if done:
                            try:
                                work.result()
                            except (SourceFailed, TransientUpdateError):
                                raise
                            except Exception as exc:  # noqa: BLE001 - a source bug must not block the update
                                raise SourceFailed(f"{source.url}: {type(exc).__name__}: {exc}", fatal=True) from None
                            break
                        (check or self._check_wanted)(download, target, deadline)
                except SourceFailed as exc:
                    failures = 1 if len(download.received) > before else failures + 1
                    if exc.fatal or failures >= options.http_attempts:
                        log.warning("download source failed; the rest comes over MQTT",
                                    extra={"model": name, "url": source.url, "error": exc.message})
                        self.emit("download_source_failed", {"model": name, "url": source.url, "message": exc.message,
                                                             "fallback": "mqtt", **download.progress()})
                        return
                    log.info("download source failed; trying again", extra={"model": name, "error": exc.message,
                                                                             "retry_s": round(delay, 1)})
                    await self._pause(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, 60.0)
        finally:
            stop.set()
            source.abort()  # a read blocked on the socket ends now, not at its time-out
            if work is not None and not work.done():
                work.add_done_callback(lambda future: future.cancelled() or future.exception())  # ends as Stopped
        self.emit("download_source_done", {"model": name, "url": source.url, "bytes": source.bytes,
                                           "requests": source.requests})

    async def _download(self, download: Download, target: dict, deadline: float, check=None) -> None:
        """Request missing chunks over MQTT, a window at a time, until the file is complete, the target
        is no longer wanted, or the download deadline passes."""
        loop = asyncio.get_running_loop()
        name = target["name"]
        asked: dict[int, float] = {}
        again: set[int] = set()  # asked more than once: their round trips are ambiguous (Karn)
        timer = RetransmitTimer(self.options.chunk_timeout_s)
        reported = -1
        while not self._frames.empty():  # frames of an earlier download
            self._frames.get_nowait()
        while not download.complete:
            (check or self._check_wanted)(download, target, deadline)
            reported = self._report_progress(download, target, reported, "mqtt")
            if not self.connected.is_set():
                began = time.monotonic()
                try:
                    await asyncio.wait_for(self.connected.wait(), 1.0)
                except asyncio.TimeoutError:
                    continue
                finally:
                    deadline += time.monotonic() - began  # a broker outage does not count against it
            if self.session_lost:
                # Without the session the broker kept, chunks asked before will not come: ask again.
                # With it, they arrive from the session's queue and are not fetched twice.
                self.session_lost = False
                asked.clear()
            now = time.monotonic()
            expired = [i for i, at in asked.items() if now - at > timer.timeout]
            for index in expired:
                del asked[index]
                again.add(index)
            if expired:
                timer.backoff()  # once per time-out, as TCP does
            missing = [i for i in download.missing() if i not in asked][: max(0, self.options.download_window - len(asked))]
            if missing and self.publish(topics.chunk_requests(self.device_id), chunk_frames.request(target["sha256"], missing)) is not None:
                for index in missing:
                    asked[index] = now
            try:
                payload = await asyncio.wait_for(self._frames.get(), 1.0)
            except asyncio.TimeoutError:
                continue
            try:
                header, data = chunk_frames.decode_frame(payload)
                if header["sha256"] != target["sha256"]:
                    continue  # a chunk of an earlier, cancelled download
                await loop.run_in_executor(self._disk, download.write, header["index"], header["offset"], data)
                at = asked.pop(header["index"], None)
                if at is not None and header["index"] not in again:
                    timer.sample(time.monotonic() - at)
            except (chunk_frames.ChunkError, BadChunk) as exc:
                # Refused by itself: what was written stays, and it costs no attempt.
                download.refused += 1
                if download.refused <= 10 or download.refused % 100 == 0:
                    self.emit("chunk_refused", {"model": name, "message": str(exc), "refused": download.refused})

    async def _probation(self, name: str, target: dict, old_health: dict | None) -> None:
        self.registry.forget_failure(name)  # pushed again on purpose: load it again
        problem = await self.registry.activate(name)
        self.state_changed()
        if problem:
            await self._roll_back(name, target, "load", f"the new version does not load in the daemon: {problem}")
            return
        served = self.registry.schedulers[name].current
        load_ratio = self.registry.load_ratios.pop(name, None)
        budget = Budget.of(self.options, target.get("probation"), self.config.model(name).deadline_ms)
        started = time.monotonic()
        while True:
            verdict = judge(budget, served.health.summary(), old_health, time.monotonic() - started, load_ratio)
            if verdict.decision == ROLL_BACK:
                await self._roll_back(name, target, verdict.reason, verdict.message)
                return
            if verdict.decision == COMMIT:
                await self._obligation("commit", self.store.commit, name, verdict.message)
                return
            await asyncio.sleep(0.25)

    async def _roll_back(self, name: str, target: dict, reason: str, message: str) -> None:
        await self._obligation("rollback", self.store.regress, name, f"{reason}: {message}")
        self._fail(target, reason, message)
        problem = await self.registry.activate(name)
        if problem:
            log.error("the old version does not serve after the rollback", extra={"model": name, "error": problem})

    # -- state for the fleet -----------------------------------------------------------------------

    def check_stale(self) -> list[str]:
        """Models whose accepted desired state has expired with no newer one since: the fleet re-signs
        desired states before they expire, so this is what a withheld (frozen) desired state looks like
        from the device. One event per expired state; the device keeps running what it runs."""
        now, _ = records.clock_now(self.record)
        stale = []
        for name, target in self.record["wanted"].items():
            expires = target.get("expires_at")
            if expires and expires < now:
                stale.append(name)
                key = (name, target.get("desired_version"))
                if key not in self._stale_reported:
                    self._stale_reported.add(key)
                    log.warning("desired state expired", extra={"model": name, "desired_version": key[1]})
                    self.emit("desired_stale", {"model": name, "desired_version": key[1], "expired_at": expires,
                                                "message": "no newer desired state arrived before this one expired; "
                                                "the fleet may be withholding updates (or stopped re-signing)"})
        return stale

    def failed_reason(self, sha256: str) -> dict | None:
        return self.record["failed"].get(sha256)


class RetransmitTimer:
    """When a requested chunk counts as lost: TCP's retransmission timer (RFC 6298) over the round
    trips of chunks asked once, never below ``updates.chunk_timeout_s``.

    A busy broker (hundreds of devices downloading at once) queues frames for longer than a fixed
    time-out; asking again then only adds the same frames to the queue (measured: 1.075x the bytes at
    200 devices with a fixed 10 s). The time-out follows the measured delay instead, and doubles at
    each loss until a clean round trip comes."""

    MAX_S = 120.0

    def __init__(self, floor_s: float):
        self.floor = floor_s
        self.srtt: float | None = None
        self.rttvar = 0.0
        self._backoff = 1.0

    @property
    def timeout(self) -> float:
        base = self.floor if self.srtt is None else max(self.floor, self.srtt + 4 * self.rttvar)
        return min(self.MAX_S, base * self._backoff)

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self._backoff = 1.0

    def backoff(self) -> None:
        self._backoff = min(self._backoff * 2, 8.0)


def _digests(target: dict) -> list[bytes]:
    from edgepack.fleet.desired import BundleRef

    return BundleRef(sha256=target["sha256"], size=target["size"], chunk_bytes=target["chunk_bytes"],
                     chunks=target["chunks"]).chunk_digests()
