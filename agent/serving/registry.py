"""The models a daemon serves: loaded from bundle files or the store, and swapped when the store changes.

``edgepack-agent install B --store S`` verifies, stages and smoke-tests B in the inactive slot and then
switches ``state.json``; a daemon serving S notices the new state on its next poll, loads and
smoke-tests the new slot itself off the event loop, and only then routes traffic to it. Until the
swap, and if the new version fails to load, the old version keeps serving.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path

from edgepack.bundle import open_bundle
from edgepack.bundle.signing import load_public_key
from edgepack.errors import EdgepackError, StoreError

from ..config import AgentConfig
from ..drift import monitor_for
from ..loader import load_bundle
from ..model import release_freed_memory
from ..store import ModelStore
from .metrics import ServingMetrics
from .scheduler import ModelScheduler, ServedVersion
from .split import candidate_problem, served_versions

log = logging.getLogger("edgepack.agent.serving")
#: how often freed memory is handed back to the OS (malloc_trim; a few ms of work)
TRIM_INTERVAL_S = 10.0


def settle_heap() -> None:
    """Collect cyclic garbage once, then freeze what is left (libraries, models, configuration) out of
    Python's cyclic collector. A full collection of the daemon's ~56 000 startup objects takes 11-20 ms
    on a 2-core host, several times that on a contended core, and it runs on the event loop whenever
    generation 2 comes due under load: health probes waited behind it. Frozen objects are still freed
    by reference counting. Called after loads and swaps (tens of ms, rarely); it unfreezes first, so the
    cycles of a retired version are still collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def time_side_by_side(old, new, rounds: int = 5, budget_s: float = 0.5) -> float | None:
    """New/old time per sample on each version's own smoke samples, runs interleaved (the fastest of
    each); None when either has no samples or a run fails."""
    from ..model import sample_feeds

    pairs = []
    for model in (old, new):
        feeds = sample_feeds(model)
        if not feeds:
            return None
        count = max(1, model.backend.count(feeds))
        pairs.append((model, feeds, count))
    best = [float("inf"), float("inf")]
    try:
        for model, feeds, _ in pairs:
            model.run(feeds, max_batch=1)  # warm-up
        spent = 0.0
        for _ in range(rounds):
            for i, (model, feeds, count) in enumerate(pairs):
                began = time.perf_counter()
                model.run(feeds, max_batch=1)
                took = time.perf_counter() - began
                spent += took
                best[i] = min(best[i], took / count)
            if spent > budget_s:
                break
    except Exception:  # noqa: BLE001 - a measurement; the smoke test already judged that it runs
        return None
    return best[1] / best[0] if best[0] > 0 else None


class ModelRegistry:
    """Model name -> scheduler; owns loading, the store watcher and shutdown."""

    def __init__(self, config: AgentConfig, metrics: ServingMetrics, bundles: list[Path] = ()):
        self.config = config
        self.metrics = metrics
        self.keys = [load_public_key(path) for path in config.trusted_keys] or None
        self.store = ModelStore(config.store, self.keys, config.profile)
        self.bundles = [Path(b) for b in bundles] + [m.bundle for m in config.models if m.bundle]
        self.schedulers: dict[str, ModelScheduler] = {}
        self._temp = Path(tempfile.mkdtemp(prefix="edgepack-agent-"))
        self._watcher: asyncio.Task | None = None
        self._daemon_lock = None
        self._failed: dict[str, str] = {}  # name -> key of a version that failed, so it is not retried forever
        self.failures: dict[str, str] = {}  # name -> why that version failed
        #: called with (event kind, body) for drift events; the fleet link adds itself
        self.event_listeners: list = []
        self._drifting: set[tuple[str, str]] = set()
        #: one refresh at a time (the watcher's and an update's activate)
        self._refreshing = asyncio.Lock()
        #: name -> new/old time per sample, timed side by side when the store's version replaced another
        self.load_ratios: dict[str, float] = {}

    # -- lookup ------------------------------------------------------------------------------------

    def get(self, name: str) -> ModelScheduler | None:
        scheduler = self.schedulers.get(name)
        return scheduler if scheduler and scheduler.current else None

    @property
    def ready(self) -> bool:
        return all(s.current is not None for s in self.schedulers.values())

    # -- loading -----------------------------------------------------------------------------------

    def _load_bundle_file(self, path: Path) -> ServedVersion:
        started = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="bundle-", dir=self._temp))
        with open_bundle(path, public_keys=self.keys, verify_files=False) as bundle:
            options = self.config.model(bundle.manifest["name"])
        model = load_bundle(path, folder, keys=self.keys, profile=self.config.profile, threads=options.threads,
                            instances=options.instances)
        self._apply_options(model)
        return self._served(model, None, started, f"file:{path}")

    def _served(self, model, slot, started: float, key: str) -> ServedVersion:
        served = ServedVersion(model, slot, time.perf_counter() - started, key)
        options = self.config.model(model.name)
        served.drift = monitor_for(model, options.drift_window, options.drift_false_alarm_rate, options.drift_min_samples,
                                   options.drift_threshold)
        if served.drift is not None:
            served.health.set_reference(served.drift.ranges)
            served.class_outputs = tuple(name for name, is_input, score in served.drift.scores_.values()
                                         if not is_input and score.classes is not None)
        return served

    def _load_store_slot(self, name: str, key: str) -> ServedVersion:
        started = time.perf_counter()
        options = self.config.model(name)
        model = self.store.load_active(name, options.threads, smoke=True, instances=options.instances)
        self._apply_options(model)
        return self._served(model, self.store.state(name).get("active"), started, key)

    def _apply_options(self, model) -> None:
        # After the smoke test, which runs the bundle's float samples.
        if self.config.model(model.name).integer_io and not model.use_integer_io():
            log.warning("integer_io ignored", extra={"model": model.name, "reason": "the model has float inputs and outputs"})

    def _store_key(self, name: str) -> str | None:
        state = self.store.state(name)
        active = state.get("active")
        if not active:
            return None
        return f"{active}:{state['slots'].get(active, {}).get('manifest_sha256')}"

    def _store_key_or_none(self, name: str) -> str | None:
        try:
            return self._store_key(name)
        except EdgepackError:
            return "unreadable"  # keep serving what is loaded

    def _scheduler(self, name: str) -> ModelScheduler:
        if name not in self.schedulers:
            self.schedulers[name] = ModelScheduler(name, self.config.model(name), self.metrics)
        return self.schedulers[name]

    def _store_names(self) -> list[str]:
        listed = [m.name for m in self.config.models if not m.bundle]
        installed = self.store.model_names()
        return sorted(set(installed) if self.config.serve_all else set(listed) & set(installed))

    async def start(self) -> None:
        """Load every bundle file and store model (a bad one is reported, the others still serve)."""
        loop = asyncio.get_running_loop()
        # One daemon per store; it owns the updates in progress, and finishes or undoes what a crash
        # interrupted (an install, an update on probation) before loading.
        updates = bool(self.config.mqtt and self.config.updates.enabled)
        lock = self.store.daemon_lock()
        try:
            lock.__enter__()
            self._daemon_lock = lock
        except StoreError:
            if updates:
                raise  # two daemons taking updates into one store would undo each other's work
            # Another daemon owns this store (its updates, its recovery); this one only serves it.
            log.warning("another daemon owns the store; serving it without recovering or updating",
                        extra={"store": str(self.store.root)})
        if self._daemon_lock:
            recovered = await loop.run_in_executor(None, lambda: self.store.recover(resume_downloads=updates))
            if recovered:
                log.warning("recovered interrupted updates", extra={"models": recovered})
        for path in self.bundles:
            try:
                served = await loop.run_in_executor(None, self._load_bundle_file, path)
            except EdgepackError as exc:
                raise EdgepackError(f"cannot serve {path}: {exc.message}") from None
            self._scheduler(served.model.name).swap(served)
        await self._refresh()
        await self._load_candidates()
        settle_heap()  # once everything is loaded, whatever changed
        self._watcher = asyncio.ensure_future(self._watch())

    def _load_candidate(self, path: Path, name: str, threads: int | None, instances: int) -> ServedVersion:
        """A shadow or B version from its bundle file: the same model, the same inputs and outputs."""
        started = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="candidate-", dir=self._temp))
        model = load_bundle(path, folder, keys=self.keys, profile=self.config.profile, threads=threads,
                            instances=instances)
        self._apply_options(model)
        active = self.schedulers[name].current.model
        problem = candidate_problem(active, model)
        if problem:
            model.close()
            raise EdgepackError(f"cannot use {path} beside {name} {active.version}: {problem}")
        return self._served(model, None, started, f"file:{path}")

    async def _load_candidates(self) -> None:
        """Load the shadow candidates and A/B versions agent.yaml names; a bad one stops the start."""
        from .shadow import ShadowRunner
        from .split import Split

        loop = asyncio.get_running_loop()
        for options in self.config.models:
            for kind in ("split", "shadow"):
                extra = getattr(options, kind)
                if extra is None:
                    continue
                scheduler = self.get(options.name)
                if scheduler is None:  # its active version failed to load (logged): the others still serve
                    log.error(f"{kind} version not loaded", extra={"model": options.name,
                              "reason": "no active version to compare it with"})
                    continue
                one = kind == "shadow"  # the shadow runs on its own low-priority thread only
                try:
                    served = await loop.run_in_executor(None, self._load_candidate, extra.bundle, options.name,
                                                        1 if one else options.threads, 1 if one else options.instances)
                except EdgepackError as exc:
                    raise EdgepackError(f"models.{options.name}.{kind}: {exc.message}") from None
                if kind == "split":
                    scheduler.split = Split(options.name, served, extra.percent)
                else:
                    scheduler.shadow = ShadowRunner(options.name, served, extra, self.metrics, scheduler.current)
                log.info(f"{kind} version loaded", extra={"model": options.name, "version": served.version,
                                                           "active": scheduler.current.version})

    # -- a shadow candidate the fleet asks for (a rollout's shadow stage) ----------------------------

    def fleet_shadow(self, name: str) -> str | None:
        """sha256 of the bundle of the shadow the fleet attached to ``name`` (None: none, or one of agent.yaml)."""
        scheduler = self.schedulers.get(name)
        shadow = getattr(scheduler, "shadow", None) if scheduler else None
        return getattr(shadow, "fleet_sha256", None) if shadow is not None else None

    async def attach_shadow(self, name: str, path: Path, sha256: str, sample_rate: float | None = None,
                            cpu_share: float | None = None) -> str:
        """Run the bundle at ``path`` in shadow beside ``name``'s active version (replacing any shadow
        it had); the candidate's version. EdgepackError when it cannot serve beside the active one."""
        from ..config import ShadowConfig
        from .shadow import ShadowRunner

        scheduler = self.get(name)
        if scheduler is None:
            raise EdgepackError(f"no active version of {name!r} to compare a shadow with")
        configured = next((m.shadow for m in self.config.models if m.name == name and m.shadow is not None), None)
        base = configured.model_dump() if configured else {}
        options = ShadowConfig(**{**base, "bundle": path, **({"sample_rate": sample_rate} if sample_rate else {}),
                                  **({"cpu_share": cpu_share} if cpu_share else {})})
        served = await asyncio.get_running_loop().run_in_executor(None, self._load_candidate, path, name, 1, 1)
        runner = ShadowRunner(name, served, options, self.metrics, scheduler.current)
        runner.fleet_sha256 = sha256
        old, scheduler.shadow = scheduler.shadow, runner
        if old is not None:
            await asyncio.get_running_loop().run_in_executor(None, old.close)  # joins a thread, closes a model
        log.info("shadow version attached", extra={"model": name, "version": served.version,
                                                    "active": scheduler.current.version})
        return served.version

    async def detach_shadow(self, name: str) -> None:
        """Stop the shadow the fleet attached to ``name`` (one agent.yaml names stays)."""
        scheduler = self.schedulers.get(name)
        old = getattr(scheduler, "shadow", None) if scheduler else None
        if old is None or getattr(old, "fleet_sha256", None) is None:
            return
        scheduler.shadow = None
        await asyncio.get_running_loop().run_in_executor(None, old.close)
        log.info("shadow version detached", extra={"model": name, "version": old.version})

    async def refresh(self) -> None:
        """Load the store's active slot of every model whose state changed since the last look."""
        if await self._refresh():
            settle_heap()

    async def activate(self, name: str) -> str | None:
        """Load and serve the store's active version of ``name`` now (the update loop awaits this after
        each switch or rollback); None once it serves, else why it does not (the old version, if any,
        keeps serving)."""
        await self.refresh()
        key = self._store_key(name)
        scheduler = self.schedulers.get(name)
        if key is None:
            return None if not (scheduler and scheduler.current and not scheduler.current.key.startswith("file:")) \
                else "the store has no active version but one is still loaded"
        if scheduler and scheduler.current and scheduler.current.key == key:
            return None
        if self._failed.get(name) == key:
            return self.failures.get(name, "it failed to load")
        if scheduler and scheduler.current and scheduler.current.key.startswith("file:"):
            return "the daemon serves this model from a bundle file given on the command line"
        if name not in self._store_names():
            return "this daemon does not serve the model (not listed in agent.yaml and serve_all is off)"
        return "it did not load"

    def forget_failure(self, name: str) -> None:
        """Let a version that failed to load be tried again (an update retries it deliberately)."""
        self._failed.pop(name, None)

    async def _refresh(self) -> bool:
        async with self._refreshing:
            return await self._refresh_locked()

    async def _refresh_locked(self) -> bool:
        """refresh(); True when a version was swapped in or unloaded."""
        loop = asyncio.get_running_loop()
        changed = False
        for name, scheduler in self.schedulers.items():
            # A model rolled back to nothing (its first version failed its probation): stop serving it.
            current = scheduler.current
            if current and not current.key.startswith("file:") and self._store_key_or_none(name) is None:
                scheduler.unload()
                self.metrics.statistics.forget(name, set())
                changed = True
        for name in self._store_names():
            scheduler = self.schedulers.get(name)
            if scheduler and scheduler.current and scheduler.current.key.startswith("file:"):
                continue  # served from a bundle file given on the command line
            try:
                key = self._store_key(name)
            except EdgepackError as exc:
                log.warning("store state unreadable", extra={"model": name, "error": exc.message})
                continue
            if key is None or (scheduler and scheduler.current and scheduler.current.key == key):
                continue
            if self._failed.get(name) == key:
                continue
            try:
                served = await loop.run_in_executor(None, self._load_store_slot, name, key)
            except Exception as exc:  # noqa: BLE001 - keep serving the old version whatever went wrong
                self.metrics.load_failures.labels(name).inc()
                message = exc.message if isinstance(exc, EdgepackError) else f"{type(exc).__name__}: {exc}"
                self._failed[name], self.failures[name] = key, message
                log.error("new version failed to load; the old one keeps serving", extra={"model": name, "error": message})
                self._scheduler(name)  # known, so readiness reports it as not ready when nothing serves
                continue
            self._failed.pop(name, None)
            old = self._scheduler(name).current
            self.load_ratios.pop(name, None)  # only this swap's timing may judge the version swapped in
            if old is not None:
                # Both versions are loaded now: time them side by side, in the same moment, so an
                # update's probation compares like with like (not two timings taken days apart).
                ratio = await loop.run_in_executor(None, time_side_by_side, old.model, served.model)
                if ratio:
                    self.load_ratios[name] = ratio
                    log.info("timed side by side", extra={"model": name, "old": old.version, "new": served.version,
                                                          "ratio": round(ratio, 3)})
            answering = set(served_versions(self._scheduler(name))) if old is not None else set()
            self._scheduler(name).swap(served)
            # Statistics of the versions still loaded: those answering (a split's B version too), and
            # the one swapped out, still draining (forgotten at the next swap). A version that was not
            # answering starts from zero, as Triton's do, even when it is the one swapped out last time.
            keep = set(served_versions(self._scheduler(name))) | ({old.version} if old is not None else set())
            self.metrics.statistics.forget(name, keep - ({served.version} - answering))
            changed = True
        return changed

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        trimmed = loop.time()
        delay = self.config.watch_interval_s
        while True:
            await asyncio.sleep(delay)
            try:
                await self.refresh()
                # The tests sort every feature's window: off the event loop.
                watched = {name: s.current for name, s in self.schedulers.items() if s.current and s.current.drift}
                computed = await loop.run_in_executor(
                    None, lambda: {name: (served, served.drift.scores()) for name, served in watched.items()})
                self.check_drift(computed)
                if loop.time() - trimmed > TRIM_INTERVAL_S:
                    # After a burst (a flood of large bodies) glibc keeps the freed memory; hand it back.
                    trimmed = loop.time()
                    await loop.run_in_executor(None, release_freed_memory)
                delay = self.config.watch_interval_s
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watcher must survive anything the disk does
                self.metrics.loop_failures.labels("store-watch").inc()
                log.exception("store watch failed")
                delay = min(max(delay * 2, self.config.watch_interval_s), 30.0)

    def check_drift(self, computed: dict | None = None) -> None:
        """Publish drift scores to /metrics; an event when one starts alarming (and when it clears).
        ``computed``: model name -> (served version, its scores), worked out off the loop."""
        for name, scheduler in self.schedulers.items():
            served = scheduler.current
            if not served or served.drift is None:
                continue
            if computed is not None and computed.get(name, (None,))[0] is served:
                scores = computed[name][1]
            else:
                scores = served.drift.scores()
            self.metrics.drift_window.labels(name).set(scores["window_samples"])
            for score, value in scores["psi"].items():
                if value is not None:
                    self.metrics.drift.labels(name, score).set(value)
            for score, test in scores["tests"].items():
                if test is None:
                    continue
                if "p" in test:
                    self.metrics.drift_p.labels(name, score).set(test["p"])
                    self.metrics.drift_statistic.labels(name, score).set(test["statistic"])
                key = (name, score)
                crossed = bool(test["alarm"])
                if crossed != (key in self._drifting):
                    (self._drifting.add if crossed else self._drifting.discard)(key)
                    body = {"model": name, "version": served.version, "score": score, **test,
                            "alpha": scores["alpha"], "false_alarm_rate": scores["false_alarm_rate"],
                            "window_samples": test["samples"]}
                    log.warning("drift" if crossed else "drift cleared", extra=body)
                    for listener in list(self.event_listeners):
                        listener("drift" if crossed else "drift_cleared", body)

    async def close(self) -> None:
        """Stop watching, finish queued requests, close every session, remove temporary files."""
        if self._watcher:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in self.schedulers.values()))
        shutil.rmtree(self._temp, ignore_errors=True)
        if self._daemon_lock:
            self._daemon_lock.__exit__(None, None, None)
