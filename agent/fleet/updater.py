"""Model updates over MQTT: signed desired state -> download -> the store's install path -> probation
-> commit or automatic rollback.

Runs on the daemon's event loop; disk work runs on one worker thread, in order. Every step is a
transition of the store's persisted lifecycle (agent.lifecycle), so a restart resumes it; what this
module keeps besides (``<store>/fleet/desired.json``) is which desired-state version each topic last
had accepted, the bundle each model is wanted at, and the bundles that failed here, so a replayed
or failed update is not taken again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from edgepack.atomic import write_json_atomic
from edgepack.errors import EdgepackError, first_line
from edgepack.fleet import chunks as chunk_frames
from edgepack.fleet import topics
from edgepack.fleet.desired import DesiredStateError, verify_desired

from .download import Download, DownloadError

log = logging.getLogger("edgepack.agent.updates")

Emit = Callable[[str, dict], None]
#: download failures that may be transient (a damaged transfer): tried this many times in all
DOWNLOAD_REASONS = {"sha256", "size", "oversized", "too-much-data"}
DOWNLOAD_ATTEMPTS = 3
#: the reason recorded when the daemon stops during a probation (not counted as a failure)
STOPPED = "the agent stopped during probation"


class Updater:
    """Takes desired states from the fleet and drives each accepted one through the lifecycle."""

    def __init__(self, config, registry, device_id: str, publish: Callable[[str, bytes], int | None], emit: Emit):
        self.config = config
        self.options = config.updates
        self.registry = registry
        self.store = registry.store
        self.device_id = device_id
        self.publish = publish
        self.emit = emit
        self.keys = registry.keys
        self.folder = self.store.root / "fleet"
        self.record_path = self.folder / "desired.json"
        self.record = self._read_record()
        self._wake = asyncio.Event()
        self._frames: asyncio.Queue = asyncio.Queue(maxsize=256)
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-disk")
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        #: set when a reconnect came without the broker's session: chunks asked before are lost
        self.session_lost = False

    # -- the persisted record ----------------------------------------------------------------------

    def _read_record(self) -> dict:
        try:
            data = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            data = {}
        return {"accepted": dict(data.get("accepted", {})), "models": dict(data.get("models", {})),
                "wanted": dict(data.get("wanted", {})), "failed": dict(data.get("failed", {}))}

    def _save_record(self) -> None:
        write_json_atomic(self.record_path, self.record)

    # -- messages from the fleet (called on the event loop) ----------------------------------------

    def topics(self) -> list[str]:
        return [topics.desired(self.device_id)] + [topics.group_desired(g) for g in self.options.groups] + [
            topics.chunk_data(self.device_id)]

    def handle_desired(self, topic: str, payload: bytes) -> None:
        """Check a desired state and, when it is new and valid, make it the wanted one (persisted)."""
        if not payload:
            return  # a cleared retained message
        try:
            state = verify_desired(payload, self.keys)
            # The signed target must be the topic's: a group's (older) desired state replayed on the
            # device topic, or on another group's, is refused.
            if topic == topics.desired(self.device_id):
                if state.device != self.device_id:
                    raise DesiredStateError("wrong-device", f"desired state on this device's topic names "
                                            f"{'device ' + repr(state.device) if state.device else 'group ' + repr(state.group)}")
            elif state.group is None or topic != topics.group_desired(state.group) or state.group not in self.options.groups:
                raise DesiredStateError("wrong-group", f"desired state on {topic} names "
                                        f"{'group ' + repr(state.group) if state.group else 'device ' + repr(state.device)}")
            # One version counter per topic and one per model, both only growing.
            topic_last = self.record["accepted"].get(topic, 0)
            if state.version == topic_last:
                return  # the retained copy of what was accepted already (after a reconnect or restart)
            last = max(topic_last, self.record["models"].get(state.model.name, 0))
            if state.version <= last:
                raise DesiredStateError("replayed", f"desired state version {state.version} is not newer than "
                                        f"version {last} accepted before (a replayed message)")
            bundle = state.for_profile(self.config.profile)
        except DesiredStateError as exc:
            log.warning("desired state refused", extra={"reason": exc.reason, "error": exc.message, "topic": topic})
            self.emit("desired_refused", {"reason": exc.reason, "message": exc.message, "topic": topic})
            return
        name = state.model.name
        target = {"name": name, "version": state.model.version, "sha256": bundle.sha256, "size": bundle.size,
                  "desired_version": state.version, "topic": topic}
        self.record["accepted"][topic] = state.version
        self.record["models"][name] = max(self.record["models"].get(name, 0), state.version)
        self.record["wanted"][name] = target
        self.record["failed"].pop(bundle.sha256, None)  # pushing it again is how an operator retries
        self._save_record()
        self.emit("desired_accepted", target)
        log.info("desired state accepted", extra={"model": name, "version": target["version"],
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

    # -- the update loop ---------------------------------------------------------------------------

    def start(self) -> None:
        # An update that ended badly while no updater watched (rolled back after a crash during its
        # probation) is not taken again.
        for name, target in self.record["wanted"].items():
            update = self.store.state(name)["update"]
            same = (update.get("target") or {}).get("sha256") == target["sha256"]
            retry = (update.get("reason") or "").startswith(STOPPED)
            if (same and update.get("result") in ("failed", "rolled_back") and not retry
                    and target["sha256"] not in self.record["failed"]):
                self._fail(target, "restart", update.get("reason") or update["result"])
        downloading = {(self.store.state(n)["update"].get("target") or {}).get("sha256")
                       for n in self.store.model_names(with_empty=True) if self.store.busy(n) == "downloading"}
        for leftover in (self.store.root / "downloads").glob("*"):
            if leftover.name.split(".")[0] not in downloading:
                leftover.unlink(missing_ok=True)
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for name in self.store.model_names(with_empty=True):
            if self.store.busy(name) == "probation":
                # A clean stop (SIGTERM, reboot) is not the new version's fault: go back to the old one
                # now, and start the update again at the next start.
                await self._disk_call(self.store.regress, name, f"{STOPPED}; the update starts again")
        self._disk.shutdown(wait=True)

    async def _disk_call(self, fn, *args, **kwargs):
        def locked():
            with self.store.locked():
                return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._disk, locked)

    def _next_target(self) -> dict | None:
        for name, target in sorted(self.record["wanted"].items()):
            failure = self.record["failed"].get(target["sha256"])
            if failure and (failure.get("reason") not in DOWNLOAD_REASONS or failure.get("attempts", 1) >= DOWNLOAD_ATTEMPTS):
                continue
            state = self.store.state(name)
            active = state.get("active")
            if active and state["slots"].get(active, {}).get("bundle_sha256") == target["sha256"]:
                continue  # already running it
            return target
        return None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                target = self._next_target()
                if target is None:
                    await self._wake.wait()
                    continue
                await self._update(target)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the updater must survive anything; the model keeps serving
                log.exception("update failed")
                self.emit("update_error", {"message": first_line(exc)})
                await asyncio.sleep(5)

    def _fail(self, target: dict, reason: str, message: str) -> None:
        attempts = self.record["failed"].get(target["sha256"], {}).get("attempts", 0) + 1
        self.record["failed"][target["sha256"]] = {"reason": reason, "message": message, "at": time.time(),
                                                   "attempts": attempts}
        self._save_record()
        log.error("update failed", extra={"model": target["name"], "reason": reason, "error": message})

    async def _update(self, target: dict) -> None:
        name = target["name"]
        state = self.store.state(name)
        if state["update"]["state"] == "idle":
            await self._disk_call(self.store.transition, name, "download", None, target=target)
        elif state["update"].get("target", {}).get("sha256") != target["sha256"]:
            if state["update"]["state"] == "downloading":  # a newer desired state replaced it
                old = state["update"].get("target") or {}
                if old.get("sha256"):
                    Download(self.store.root / "downloads", old["sha256"], old.get("size", 1)).discard()
                await self._disk_call(self.store.transition, name, "cancel", "a newer desired state replaced it")
                await self._disk_call(self.store.transition, name, "download", None, target=target)
            else:
                return  # finishing another update first (it ends in idle; then this one starts)
        download = Download(self.store.root / "downloads", target["sha256"], target["size"])
        try:
            await self._download(download, target)
            path = await asyncio.get_running_loop().run_in_executor(self._disk, download.verify)
        except DownloadError as exc:
            self._fail(target, exc.reason, exc.message)
            await self._disk_call(self.store.transition, name, "fail", exc.message)
            return
        await self._disk_call(self.store.transition, name, "downloaded")
        try:
            await self._disk_call(self.store.stage, name, path, self.config.model(name).threads)
        except EdgepackError as exc:
            self._fail(target, "install", exc.message)  # stage() recorded the failure transition
            download.discard()
            return
        download.discard()
        scheduler = self.registry.schedulers.get(name)
        old = scheduler.current if scheduler else None
        old_state = self.store.state(name)
        old_slot = old_state["slots"].get(old_state.get("active") or "", {})
        await self._disk_call(self.store.switch, name)
        await self._probation(name, target, old, old_slot)

    async def _download(self, download: Download, target: dict) -> None:
        """Request missing chunks, a window at a time, until the file is complete."""
        loop = asyncio.get_running_loop()
        asked: dict[int, float] = {}
        while not self._frames.empty():  # frames of an earlier download
            self._frames.get_nowait()
        while not download.complete:
            if not self.connected.is_set():
                await self.connected.wait()
            if self.session_lost:
                # Without the session the broker kept, chunks asked before will not come: ask again.
                # With it, they arrive from the session's queue and are not fetched twice.
                self.session_lost = False
                asked.clear()
            now = time.monotonic()
            for index in [i for i, at in asked.items() if now - at > self.options.chunk_timeout_s]:
                del asked[index]
            wanted = [i for i in download.missing() if i not in asked][: max(0, self.options.download_window - len(asked))]
            if wanted and self.publish(topics.chunk_requests(self.device_id), chunk_frames.request(target["sha256"], wanted)) is not None:
                log.debug("chunks asked", extra={"chunks": wanted, "missing": len(download.missing())})
                for index in wanted:
                    asked[index] = now
            try:
                payload = await asyncio.wait_for(self._frames.get(), 1.0)
            except asyncio.TimeoutError:
                continue
            try:
                header, data = chunk_frames.decode_frame(payload)
            except chunk_frames.ChunkError as exc:
                self.emit("chunk_refused", {"model": target["name"], "message": str(exc)})
                if exc.index is not None:
                    asked.pop(exc.index, None)  # ask again at once
                continue
            if header["sha256"] != target["sha256"]:
                continue  # a chunk of an earlier, cancelled download
            asked.pop(header["index"], None)
            await loop.run_in_executor(self._disk, download.write, header, data)

    async def _wait_loaded(self, name: str, timeout: float = 300.0) -> str | None:
        """None once the daemon serves the store's active version of ``name``, else why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            key = self.registry._store_key(name)
            scheduler = self.registry.schedulers.get(name)
            if scheduler and scheduler.current and scheduler.current.key == key:
                return None
            if self.registry._failed.get(name) == key:
                return self.registry.failures.get(name, "it failed to load")
            await asyncio.sleep(0.1)
        return "it did not load within 300 s"

    async def _probation(self, name: str, target: dict, old, old_slot: dict) -> None:
        problem = await self._wait_loaded(name)
        if problem:
            await self._regress(name, target, "load", f"the new version does not load in the daemon: {problem}")
            return
        new = self.registry.schedulers[name].current
        before = old.health.summary() if old else None
        new_slot = self.store.state(name)["slots"].get(self.store.state(name)["active"], {})
        ratio = self.options.max_latency_ratio
        deadline = time.monotonic() + self.options.probation_s
        while True:
            health = new.health.summary()
            reason = None
            if health["nonfinite"]:
                reason = ("nonfinite", f"the new version returned NaN or Inf in {health['nonfinite']} of {health['runs']} runs")
            elif health["runs"] >= self.options.min_runs and health["error_rate"] > self.options.max_error_rate:
                reason = ("errors", f"error rate {health['error_rate']:.2f} above {self.options.max_error_rate}")
            elif (old_slot.get("sample_seconds") and new_slot.get("sample_seconds")
                  and new_slot["sample_seconds"] > ratio * old_slot["sample_seconds"]):
                reason = ("latency", f"the new version takes {new_slot['sample_seconds'] / old_slot['sample_seconds']:.1f}x "
                          f"the old one's time per sample at load (limit {ratio}x)")
            elif (before and before["sample_seconds_p50"] and health["sample_seconds_p50"]
                  and health["runs"] >= self.options.min_runs and before["runs"] >= self.options.min_runs
                  and health["sample_seconds_p50"] > ratio * before["sample_seconds_p50"]):
                reason = ("latency", f"the new version serves at {health['sample_seconds_p50'] / before['sample_seconds_p50']:.1f}x "
                          f"the old one's latency (limit {ratio}x)")
            if reason:
                await self._regress(name, target, *reason)
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        await self._disk_call(self.store.commit, name, f"healthy for {self.options.probation_s:g} s: {health['runs']} runs, "
                              f"{health['errors']} errors")

    async def _regress(self, name: str, target: dict, reason: str, message: str) -> None:
        self._fail(target, reason, message)
        await self._disk_call(self.store.regress, name, f"{reason}: {message}")
        await self._wait_loaded(name, timeout=120.0)

    # -- state for the fleet -----------------------------------------------------------------------

    def failed_reason(self, sha256: str) -> dict | None:
        return self.record["failed"].get(sha256)


def read_record(store_root: Path) -> dict:
    """The updater's record of a store (for status displays)."""
    try:
        return json.loads((Path(store_root) / "fleet" / "desired.json").read_text())
    except (OSError, ValueError):
        return {}
