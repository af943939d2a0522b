"""``edgepack fleet simulate``: N simulated agents in one process, for tests and benchmarks.

Each device runs the agent's own fleet code on one shared asyncio loop: :class:`agent.fleet.link.FleetLink`
(the paho transport, the telemetry spool, retained state, events), the :class:`agent.updates.updater.Updater`,
and a :class:`agent.store.ModelStore` with A/B slots whose staging verifies the signature, loads and
smoke-tests the bundle with ONNX Runtime. Each has its own id, store folder, spool and MQTT session.
Only serving is simulated: :class:`SimRegistry` stands in for ``agent.serving.registry.ModelRegistry``
and "serves" the store's active version (staging loaded and smoke-tested it already; no session is
kept), with requests scripted per release (:class:`Release`: latency distribution, error rate, predicted
classes), recorded in a real ``ServingMetrics`` and ``VersionHealth``, so the real probation judges them
and the real telemetry reports them.

Faults, per device (:class:`Faults`):

- **install failure** of a version: it does not "load" in the daemon (``activate`` answers a problem);
  the real updater rolls back, records and reports the failure;
- **offline** for a while: the socket is cut (no DISCONNECT: the broker publishes the Last Will) and
  the transport stays down; the device keeps serving and spooling telemetry, then reconnects and the
  spool drains;
- **crash mid-download**: the first time a download passes 50% the device's tasks are cancelled and its
  socket cut, as a dead process leaves them; it then boots again from its store like a rebooted agent
  (recovery, a new boot id), and the download resumes from the chunks on disk.

Threads: one paho thread and one spool writer per device (the agent's own); the disk work of every
device's updater, recovery and installs runs on one pool shared by all devices (each device still has at
most one disk job at a time, as with its own single worker).

Reaches into agent internals (no public API for these): ``Updater._disk`` (the shared pool) and
``_task``, ``FleetLink._tasks`` (a crash cancels them), ``Transport._stop/_client/_thread`` (cutting and
resuming a connection), ``Spool._db`` (``spool_sync``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import gc
import json
import logging
import math
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from edgepack.errors import EdgepackError, UsageError

log = logging.getLogger("edgepack.fleet.simulate")

#: the device whose task logs (set in each device's task; its child tasks inherit it)
_DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("simulated_device", default=None)
#: a crash-download device crashes the first time a download passes this share
CRASH_AT_PERCENT = 50.0


# -- scripts -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """What serving one version looks like: latency lognormal around ``latency_ms`` (its median) with
    shape ``latency_sigma``, a failed request with probability ``error_rate``, and the predicted class
    of each successful one drawn from ``classes`` (label, weight)."""

    latency_ms: float = 10.0
    latency_sigma: float = 0.3
    error_rate: float = 0.0
    classes: tuple[tuple[str, float], ...] = (("0", 1.0), ("1", 1.0), ("2", 1.0))
    #: as a shadow candidate: the share of samples that agree with the active version
    agreement: float = 1.0


def parse_release(text: str, base: Release = Release()) -> Release:
    """``latency_ms=30,latency_sigma=0.2,error_rate=0.05,classes=0.2/0.3/0.5`` (classes: weights of the
    labels 0, 1, 2…, or ``cat:0.2/dog:0.8``); keys not given keep ``base``'s values."""
    values = {"latency_ms": base.latency_ms, "latency_sigma": base.latency_sigma, "error_rate": base.error_rate,
              "classes": base.classes, "agreement": base.agreement}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        key = {"sigma": "latency_sigma", "latency": "latency_ms"}.get(key.strip(), key.strip())
        try:
            if key == "classes":
                weights = []
                for index, item in enumerate(value.split("/")):
                    label, _, weight = item.rpartition(":")
                    weights.append((label or str(index), float(weight)))
                if not weights or any(w < 0 or not math.isfinite(w) for _, w in weights) or sum(w for _, w in weights) <= 0:
                    raise ValueError
                values["classes"] = tuple(weights)
            elif key in values:
                values[key] = float(value)
            else:
                raise UsageError(f"--metrics: unknown key {key!r} in {text!r}; use latency_ms, latency_sigma, "
                                 "error_rate, classes, agreement")
        except ValueError:
            raise UsageError(f"--metrics: {part!r} is not a valid value (e.g. latency_ms=30, error_rate=0.05, "
                             "classes=0.2/0.3/0.5)") from None
    if (values["latency_ms"] <= 0 or values["latency_sigma"] < 0 or not 0 <= values["error_rate"] <= 1
            or not 0 <= values["agreement"] <= 1):
        raise UsageError(f"--metrics {text!r}: latency_ms > 0, latency_sigma >= 0, 0 <= error_rate <= 1, "
                         "0 <= agreement <= 1")
    return Release(**values)


def parse_script(specs) -> dict[str, Release]:
    """``VERSION:KEY=VALUE,…`` per release (``default:…`` for every version not named) -> releases;
    the ``default`` entry is always there."""
    script: dict[str, Release] = {}
    entries = []
    for spec in specs:
        version, sep, rest = spec.partition(":")
        if not sep or not version:
            raise UsageError(f"--metrics {spec!r}: give VERSION:KEY=VALUE,… (or default:KEY=VALUE,…)")
        entries.append((version.strip(), rest))
    default = Release()
    for version, rest in entries:
        if version == "default":
            default = parse_release(rest, default)
    script["default"] = default
    for version, rest in entries:
        if version != "default":
            script[version] = parse_release(rest, default)
    return script


def select(spec: str, ids: list[str], option: str) -> set[str]:
    """Devices named by ``spec``: ``all``, a fraction (``0.2``: the first 20% of the device indexes, at
    least one), or ids joined by '+' (``sim-0001+sim-0007``)."""
    spec = spec.strip()
    if spec == "all":
        return set(ids)
    try:
        share = float(spec)
    except ValueError:
        chosen = [s.strip() for s in spec.split("+") if s.strip()]
        unknown = sorted(set(chosen) - set(ids))
        if not chosen or unknown:
            raise UsageError(f"{option}: {', '.join(unknown) or spec!r} is not a simulated device "
                             f"(they are {ids[0]} … {ids[-1]}), a fraction or 'all'") from None
        return set(chosen)
    if not 0 <= share <= 1:
        raise UsageError(f"{option}: the fraction {spec} must lie between 0 and 1")
    count = max(1, math.floor(share * len(ids) + 0.5)) if share > 0 else 0
    return set(ids[:count])


@dataclass
class Faults:
    """Faults scripted per device."""

    fail_install: dict[str, set[str]] = field(default_factory=dict)  # version -> devices
    offline: list[tuple[set[str], float, float]] = field(default_factory=list)  # devices, start s, duration s
    crash_download: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, ids: list[str], fail_install=(), offline=(), crash_download=()) -> "Faults":
        faults = cls()
        for spec in fail_install:
            version, sep, who = spec.partition(":")
            if not sep or not version or not who:
                raise UsageError(f"--fail-install {spec!r}: give VERSION:SPEC (SPEC: 0.2, all or sim-0001+sim-0007)")
            faults.fail_install.setdefault(version, set()).update(select(who, ids, "--fail-install"))
        for spec in offline:
            parts = spec.rsplit(":", 2)
            try:
                who, start, duration = parts[0], float(parts[1]), float(parts[2])
                if start < 0 or duration <= 0:
                    raise ValueError
            except (ValueError, IndexError):
                raise UsageError(f"--offline {spec!r}: give SPEC:START_S:DURATION_S (e.g. 0.1:10:30)") from None
            faults.offline.append((select(who, ids, "--offline"), start, duration))
        for spec in crash_download:
            faults.crash_download |= select(spec, ids, "--crash-download")
        return faults


@dataclass
class Options:
    """Everything ``edgepack fleet simulate`` was told (see its --help)."""

    count: int
    broker: str
    profiles: list[str]
    key: Path
    installs: list[Path]
    store_root: Path
    fleet_key: Path | None = None
    prefix: str = "sim"
    groups: list[str] = field(default_factory=list)
    protocol: str = "auto"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    interval_s: float = 2.0
    rate: float = 5.0
    tick_s: float = 0.5
    metrics: list[str] = field(default_factory=list)
    fail_install: list[str] = field(default_factory=list)
    offline: list[str] = field(default_factory=list)
    crash_download: list[str] = field(default_factory=list)
    probation_s: float = 2.0
    min_runs: int = 5
    chunk_timeout_s: float = 2.0
    download_window: int | None = None
    reboot_s: float = 1.0
    duration_s: float | None = None
    status: Path | None = None
    seed: int = 0
    disk_threads: int = 8
    spool_sync: str = "full"
    log_level: str = "warning"


# -- the simulated serving side ----------------------------------------------------------------------


class SimServed:
    """The version a simulated device serves: what FleetLink, the updater and telemetry read of a
    ``ServedVersion`` (version, key, slot, a real VersionHealth, no drift monitor) and the cumulative
    count of each predicted class (telemetry sends them per message)."""

    def __init__(self, version: str, slot: str | None, key: str):
        from agent.serving.scheduler import VersionHealth

        self.version = version
        self.slot = slot
        self.key = key
        self.health = VersionHealth()
        self.drift = None
        self.predictions: collections.Counter = collections.Counter()
        self.load_seconds = 0.0


class SimShadow:
    """A simulated shadow candidate: what telemetry and the fleet link read of a ``ShadowRunner``
    (version, state, summary), its agreement and latency scripted per version (``--metrics``)."""

    def __init__(self, version: str, sha256: str, active: str):
        self.version, self.fleet_sha256, self.active = version, sha256, active
        self.state = "running"
        self.samples = self.agreeing = self.errors = 0
        self.latency = collections.deque(maxlen=512)

    def summary(self) -> dict:
        from agent.serving.shadow import percentiles

        agreement = self.agreeing / self.samples if self.samples else None
        return {"version": self.version, "state": self.state, "active": self.active,
                "requests": {k: v for k, v in (("compared", self.samples), ("errors", self.errors)) if v},
                "agreement": agreement,
                "outputs": {"output": {"kind": "classes", "samples": self.samples, "top1_agreement": agreement}},
                "latency_s": percentiles(list(self.latency))}

    def close(self) -> None:
        self.state = "stopped"


class SimScheduler:
    def __init__(self, name: str):
        self.name = name
        self.current: SimServed | None = None
        self.shadow: SimShadow | None = None


class SimRegistry:
    """What FleetLink and the Updater use of ``ModelRegistry``: ``store``, ``keys``, ``schedulers``,
    ``failures``, ``event_listeners``, ``load_ratios``, ``get``, ``forget_failure`` and ``activate``."""

    def __init__(self, config, metrics, fails):
        from agent.store import ModelStore
        from edgepack.bundle.signing import load_public_key

        self.config = config
        self.metrics = metrics
        self.keys = [load_public_key(path) for path in config.trusted_keys] or None
        self.store = ModelStore(config.store, self.keys, config.profile)
        self.schedulers: dict[str, SimScheduler] = {}
        self.failures: dict[str, str] = {}
        self.event_listeners: list = []
        self.load_ratios: dict[str, float] = {}
        self._fails = fails  # version -> whether it must fail to "load" here
        self._failed: dict[str, str] = {}
        self._lock = None

    def get(self, name: str) -> SimScheduler | None:
        scheduler = self.schedulers.get(name)
        return scheduler if scheduler and scheduler.current else None

    @property
    def ready(self) -> bool:
        return all(s.current is not None for s in self.schedulers.values())

    async def start(self, executor) -> None:
        """As the daemon starts: own the store, finish or undo what a crash interrupted (a download
        resumes), serve what is active."""
        lock = self.store.daemon_lock()
        lock.__enter__()
        self._lock = lock
        await asyncio.get_running_loop().run_in_executor(executor, lambda: self.store.recover(resume_downloads=True))
        for name in self.store.model_names():
            await self.activate(name)

    def close(self) -> None:
        if self._lock:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def forget_failure(self, name: str) -> None:
        self._failed.pop(name, None)

    def fleet_shadow(self, name: str) -> str | None:
        scheduler = self.schedulers.get(name)
        return scheduler.shadow.fleet_sha256 if scheduler and scheduler.shadow else None

    async def attach_shadow(self, name: str, path: Path, sha256: str, sample_rate=None, cpu_share=None) -> str:
        """"Load" the candidate: its manifest's version (a scripted install failure fails it too)."""
        from edgepack.bundle import open_bundle
        from edgepack.errors import EdgepackError

        scheduler = self.get(name)
        if scheduler is None:
            raise EdgepackError(f"no active version of {name!r} to compare a shadow with")
        with open_bundle(path, verify_files=False) as bundle:
            version = bundle.manifest["version"]
        if self._fails(version):
            raise EdgepackError(f"scripted install failure of {version} (edgepack fleet simulate --fail-install)")
        scheduler.shadow = SimShadow(version, sha256, scheduler.current.version)
        return version

    async def detach_shadow(self, name: str) -> None:
        scheduler = self.schedulers.get(name)
        if scheduler and scheduler.shadow:
            scheduler.shadow.close()
            scheduler.shadow = None

    async def activate(self, name: str) -> str | None:
        """Serve the store's active version of ``name`` (None), or say why not (the old one serves on)."""
        state = self.store.state(name)
        scheduler = self.schedulers.setdefault(name, SimScheduler(name))
        active = state.get("active")
        if not active:
            scheduler.current = None  # rolled back to nothing
            return None
        info = state["slots"].get(active, {})
        key = f"{active}:{info.get('manifest_sha256')}"
        old = scheduler.current
        if old is not None and old.key == key:
            return None
        if self._failed.get(name) == key:
            return self.failures.get(name, "it failed to load")
        version = info.get("version")
        if self._fails(version):
            self._failed[name] = key
            self.failures[name] = f"scripted install failure of {version} (edgepack fleet simulate --fail-install)"
            self.metrics.load_failures.labels(name).inc()
            return self.failures[name]
        scheduler.current = SimServed(version, active, key)
        self.metrics.model_active(name, version, active, old.version if old else None, old.slot if old else None)
        return None


class _Lane(concurrent.futures.Executor):
    """One device's view of the shared disk pool: its jobs, so a crash can wait for the one in flight
    (a process dies between system calls, not inside this write) and a stop does not shut the pool."""

    def __init__(self, pool: concurrent.futures.Executor):
        self.pool = pool
        self.pending: set[concurrent.futures.Future] = set()

    def submit(self, fn, /, *args, **kwargs):
        future = self.pool.submit(fn, *args, **kwargs)
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if wait:
            concurrent.futures.wait(list(self.pending))


async def _cancel(tasks) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again while one runs on: before Python
    3.12, ``asyncio.wait_for`` returns its result instead of raising when the cancellation arrives as the
    awaited thing completes (the updater's chunk wait does that under load), so one cancel may be lost."""
    pending = [task for task in tasks if task is not None and not task.done()]
    while pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.2)
        pending = [task for task in pending if not task.done()]


def _cut(transport) -> None:
    """Drop the broker connection as a pulled cable or a dead process does: no DISCONNECT (the broker
    publishes the Last Will), and the transport's thread ends instead of reconnecting."""
    transport._stop.set()
    deadline = time.monotonic() + 10
    while transport._thread is not None and transport._thread.is_alive() and time.monotonic() < deadline:
        client = transport._client
        sock = client.socket() if client is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        transport._thread.join(0.5)


def _resume(transport) -> None:
    """Start a cut transport again: it reconnects (the broker kept its session) as after an outage."""
    transport._stop.clear()
    transport.start()


class SimDevice:
    """One simulated agent: its config, store and (while it runs) registry, metrics and fleet link."""

    def __init__(self, sim: "Simulation", index: int, device_id: str, profile: str, bundle: Path, model: str):
        self.sim = sim
        self.index = index
        self.id = device_id
        self.profile = profile
        self.bundle = bundle
        self.model = model
        self.root = sim.options.store_root / device_id
        self.rng = random.Random(f"{sim.options.seed}:{device_id}")
        self.registry: SimRegistry | None = None
        self.metrics = None
        self.link = None
        self.lane = _Lane(sim.pool)
        self.boots = 0
        self.crashed = False
        self.crashes = 0
        self.offline = False
        self.carry = 0.0
        self.dirty = True
        self.summary: dict = {}
        self.config = self._config()

    def _config(self):
        from agent.config import AgentConfig, ConfigError
        from edgepack.profiles import validation_problems
        from pydantic import ValidationError

        o, broker = self.sim.options, self.sim.address
        data = {
            "device_id": self.id, "profile": self.profile, "store": str(self.root),
            "trusted_keys": [str(o.key)], "fleet_keys": [str(o.fleet_key or o.key)],
            "models": [{"name": self.model, "threads": 1}],
            "mqtt": {"host": broker["host"], "port": broker["port"], "protocol": o.protocol, "tls": broker["tls"],
                     "username": o.username, "password": o.password, "ca_file": str(o.ca_file) if o.ca_file else None,
                     "reconnect_min_s": 0.5, "reconnect_max_s": 10.0},
            "telemetry": {"interval_s": o.interval_s},
            "updates": {"groups": list(o.groups), "probation_s": o.probation_s, "min_runs": o.min_runs,
                        "chunk_timeout_s": o.chunk_timeout_s,
                        **({"download_window": o.download_window} if o.download_window else {})},
        }
        try:
            return AgentConfig.model_validate(data)
        except ValidationError as exc:
            raise ConfigError("simulated device config: " + "; ".join(validation_problems(exc))) from None

    def fails(self, version: str | None) -> bool:
        return self.id in self.sim.faults.fail_install.get(version or "", ())

    # -- lifecycle ---------------------------------------------------------------------------------

    def prepare(self) -> str:
        """On the disk pool: install the starting bundle through the store's normal path, unless this
        store already has the model (a restarted simulator resumes where it was)."""
        from agent.store import ModelStore
        from edgepack.bundle.signing import load_public_key

        store = ModelStore(self.root, [load_public_key(k) for k in self.config.trusted_keys], self.profile)
        state = store.state(self.model)
        if state.get("active"):
            return "kept"
        store.recover()
        store.install(self.bundle, threads=1)
        return "installed"

    async def boot(self) -> None:
        """Start as the daemon does: the registry (recovery), then the fleet link and its updater."""
        from agent.fleet.link import FleetLink
        from agent.serving.metrics import ServingMetrics

        _DEVICE.set(self.id)
        self.boots += 1
        self.metrics = ServingMetrics()
        registry = SimRegistry(self.config, self.metrics, self.fails)
        await registry.start(self.lane)
        registry.store.listeners.append(self._store_changed)
        link = FleetLink(self.config, registry, self.metrics)
        if self.sim.options.spool_sync != "full":
            with link.spool._lock:
                link.spool._db.execute(f"PRAGMA synchronous={self.sim.options.spool_sync.upper()}")
        await link.start()
        if link.updater:
            link.updater._disk = self.lane  # the shared pool (one job at a time per device, as before)
            published = link.updater.state_changed

            def state_changed() -> None:
                published()
                self._check_crash(link)

            link.updater.state_changed = state_changed
        self.registry, self.link, self.offline, self.dirty = registry, link, False, True

    def _store_changed(self, name: str, entry: dict, state: dict) -> None:
        self.dirty = True  # from the disk pool: the status loop reads the state again

    def _check_crash(self, link) -> None:
        if self.crashed or self.id not in self.sim.faults.crash_download or link is not self.link:
            return
        if any(p.get("percent", 0) >= CRASH_AT_PERCENT for p in link.updater.progress.values()):
            self.crashed = True
            log.warning("crashing mid-download (scripted)", extra={"progress": dict(link.updater.progress)})
            self.sim.spawn(self.crash())

    async def crash(self) -> None:
        """Die abruptly (tasks cancelled, the socket cut without DISCONNECT, nothing flushed or ended),
        then boot again from the store after ``reboot_s``."""
        link, registry = self.link, self.registry
        if link is None:
            return
        self.link = None  # no more traffic until it is back
        loop = asyncio.get_running_loop()
        await _cancel(list(link._tasks) + [link.updater._task if link.updater else None])
        await loop.run_in_executor(None, self.lane.shutdown, True)
        await loop.run_in_executor(None, _cut, link.transport)
        # What was spooled stays in the file (SQLite); the writer's thread goes with the process.
        await loop.run_in_executor(None, link.writer.close, 5.0)
        link.spool.close()
        registry.close()
        self.crashes += 1
        self.dirty = True
        await asyncio.sleep(self.sim.options.reboot_s)
        if not self.sim.stopping:
            await self.boot()
            log.warning("booted again after the crash", extra={"boot": self.link.boot})

    async def go_offline(self, start: float, duration: float) -> None:
        await asyncio.sleep(max(0.0, start - (time.monotonic() - self.sim.started)))
        link = self.link
        while link is None and not self.sim.stopping:  # rebooting: the outage begins once it is up
            await asyncio.sleep(0.2)
            link = self.link
        if self.sim.stopping:
            return
        log.warning("going offline (scripted)", extra={"duration_s": duration})
        self.offline = True
        await asyncio.get_running_loop().run_in_executor(None, _cut, link.transport)
        await asyncio.sleep(duration)
        self.offline = False
        if link is self.link and not self.sim.stopping:
            _resume(link.transport)
            log.warning("back online (scripted)")

    async def close(self) -> None:
        """A clean stop (SIGTERM): FleetLink.close() sends what it can and leaves the offline state."""
        link, registry = self.link, self.registry
        self.link = None
        if link is not None:
            if self.offline:
                _resume(link.transport)  # stopped while cut: let close() find a transport to stop
            if link.updater:
                # What Updater.close() does first, made sure of (see _cancel); it then ends probations.
                await _cancel([link.updater._task])
            try:
                await link.close()
            except Exception:  # noqa: BLE001 - the other devices still stop cleanly
                log.exception("fleet link close failed")
        if registry is not None:
            registry.close()

    # -- scripted traffic --------------------------------------------------------------------------

    def serve(self, seconds: float) -> None:
        """The requests of ``seconds`` of traffic, on what this device serves now."""
        if self.link is None or self.registry is None:
            return
        self.carry += self.sim.options.rate * seconds
        count = int(self.carry)
        self.carry -= count
        if not count:
            return
        for name, scheduler in self.registry.schedulers.items():
            served = scheduler.current
            if served is None:
                continue
            release = self.sim.release(served.version)
            mu, sigma, rng = math.log(release.latency_ms / 1000.0), release.latency_sigma, self.rng
            labels, cumulative = self.sim.classes(release)
            # What ServingMetrics.observe_request records, on the label children it would look up each time.
            latency = self.metrics.request_seconds.labels(name)
            health = served.health
            ok = errors = 0
            for _ in range(count):
                if rng.random() < release.error_rate:
                    errors += 1
                    health.failed()
                    continue
                taken = rng.lognormvariate(mu, sigma)
                latency.observe(taken)
                health.observe(1, taken)
                ok += 1
            if ok:
                self.metrics.requests.labels(name, "ok").inc(ok)
                served.predictions.update(rng.choices(labels, cum_weights=cumulative, k=ok))
            if errors:
                self.metrics.requests.labels(name, "error").inc(errors)
            shadow = scheduler.shadow
            if shadow is not None and shadow.version == served.version:
                scheduler.shadow = None  # promoted: the agent drops a shadow of the version it now serves
            elif shadow is not None and ok:
                candidate = self.sim.release(shadow.version)
                shadow.samples += ok
                shadow.agreeing += sum(rng.random() < candidate.agreement for _ in range(ok))
                shadow.errors += sum(rng.random() < candidate.error_rate for _ in range(ok))
                shadow.latency.extend(rng.lognormvariate(math.log(candidate.latency_ms / 1000.0), candidate.latency_sigma)
                                      for _ in range(min(ok, 32)))

    def status(self) -> dict:
        if self.dirty:
            self.dirty = False
            try:
                from agent.store import ModelStore

                state = (self.registry.store if self.registry else ModelStore(self.root)).state(self.model)
                slots = state.get("slots", {})
                update = state["update"]
                self.summary = {"active": slots.get(state.get("active") or "", {}).get("version"),
                                "previous": slots.get(state.get("previous") or "", {}).get("version"),
                                "update_state": update.get("state"), "result": update.get("result"),
                                "target": (update.get("target") or {}).get("version"),
                                "reason": update.get("reason")}
            except EdgepackError as exc:
                self.summary = {"error": exc.message}
        scheduler = self.registry.schedulers.get(self.model) if self.registry and self.link else None
        online = bool(self.link and self.link.transport and self.link.transport.connected)
        return {"profile": self.profile, **self.summary, "online": online,
                "serving": scheduler.current.version if scheduler and scheduler.current else None,
                "boots": self.boots, "crashes": self.crashes,
                "download": dict(self.link.updater.progress.get(self.model) or {}) if self.link and self.link.updater else {}}


# -- the fleet of them -------------------------------------------------------------------------------


def _broker_address(url: str) -> dict:
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise UsageError(f"--broker {url!r}: give mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    tls = parsed.scheme == "mqtts"
    return {"host": parsed.hostname, "port": parsed.port or (8883 if tls else 1883), "tls": tls}


def _install_bundles(paths: list[Path], profiles: list[str]) -> tuple[dict[str, Path], str]:
    """profile -> the starting bundle for it, and the model name (one model for all)."""
    from edgepack.bundle import open_bundle

    by_profile: dict[str, Path] = {}
    names = set()
    for path in paths:
        with open_bundle(path, verify_files=False) as bundle:
            manifest = bundle.manifest
        if manifest["profile"] in by_profile:
            raise UsageError(f"--install: two bundles for profile {manifest['profile']!r} ({by_profile[manifest['profile']]}, "
                             f"{path}); give one per profile")
        by_profile[manifest["profile"]] = Path(path)
        names.add(manifest["name"])
    if len(names) > 1:
        raise UsageError(f"--install: the bundles are of different models ({', '.join(sorted(names))}); give one model")
    missing = [p for p in profiles if p not in by_profile]
    if missing:
        raise UsageError(f"--install: no bundle for profile {', '.join(missing)} (the bundles are for "
                         f"{', '.join(sorted(by_profile))}); give one bundle per --profile")
    return by_profile, names.pop()


class _DeviceField(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        device = _DEVICE.get()
        if device and not hasattr(record, "device"):
            record.device = device
        return True


class Simulation:
    """N simulated devices on one event loop, the traffic tick, the faults and the status file."""

    def __init__(self, options: Options):
        from edgepack.fleet import topics

        self.options = options
        self.address = _broker_address(options.broker)
        topics.check_id("device", f"{options.prefix}-0001")
        for group in options.groups:
            topics.check_id("group", group)
        bundles, self.model = _install_bundles(options.installs, options.profiles)
        width = max(4, len(str(options.count)))
        ids = [f"{options.prefix}-{i:0{width}d}" for i in range(1, options.count + 1)]
        self.faults = Faults.parse(ids, options.fail_install, options.offline, options.crash_download)
        self.script = parse_script(options.metrics)
        self.pool = concurrent.futures.ThreadPoolExecutor(options.disk_threads, thread_name_prefix="sim-disk")
        self.devices = [SimDevice(self, i, device_id, options.profiles[i % len(options.profiles)],
                                  bundles[options.profiles[i % len(options.profiles)]], self.model)
                        for i, device_id in enumerate(ids)]
        self.started = time.monotonic()
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._classes: dict[Release, tuple[list[str], list[float]]] = {}

    def release(self, version: str) -> Release:
        return self.script.get(version) or self.script["default"]

    def classes(self, release: Release) -> tuple[list[str], list[float]]:
        if release not in self._classes:
            labels = [label for label, _ in release.classes]
            total, cumulative = 0.0, []
            for _, weight in release.classes:
                total += weight
                cumulative.append(total)
            self._classes[release] = (labels, cumulative)
        return self._classes[release]

    def spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulated device task failed", exc_info=task.exception())

    def _dump_tasks(self) -> None:
        """SIGUSR1: every task's stack on stderr (what a stuck simulation waits for)."""
        for task in asyncio.all_tasks():
            task.print_stack(limit=8, file=sys.stderr)

    async def run(self) -> int:
        from agent.runtime.onnx_backend import allow_spinning

        allow_spinning(False)  # as every agent command: sessions do not spin while waiting
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="sim-io"))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self._dump_tasks)
        began = time.monotonic()
        o = self.options
        outcomes = await asyncio.gather(*(loop.run_in_executor(self.pool, d.prepare) for d in self.devices))
        installed = outcomes.count("installed")
        print(f"simulate: {installed} stores installed, {len(outcomes) - installed} kept, "
              f"in {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
        self.started = time.monotonic()
        gate = asyncio.Semaphore(32)

        async def boot(device: SimDevice) -> None:
            async with gate:
                await device.boot()

        background: list[asyncio.Task] = []
        try:
            await asyncio.gather(*(asyncio.ensure_future(boot(d)) for d in self.devices))
            gc.collect()
            gc.freeze()  # the devices' long-lived objects stay out of the collector's full passes
            for device in self.devices:
                for who, start, duration in self.faults.offline:
                    if device.id in who:
                        background.append(asyncio.ensure_future(self._in_context(device, device.go_offline(start, duration))))
            background.append(asyncio.ensure_future(self._traffic()))
            background.append(asyncio.ensure_future(self._announce()))
            if o.status:
                background.append(asyncio.ensure_future(self._status_loop()))
            if o.duration_s is None:
                await stop.wait()
            else:
                try:
                    await asyncio.wait_for(stop.wait(), o.duration_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.stopping = True
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            # A device crashing now finishes its reboot first, so it stops like the others.
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            await asyncio.gather(*(d.close() for d in self.devices), return_exceptions=True)
            if o.status:
                self._write_status()
            self.pool.shutdown(wait=True)
        print(f"simulate: {len(self.devices)} devices stopped", file=sys.stderr, flush=True)
        return 0

    async def _in_context(self, device: SimDevice, coroutine):
        _DEVICE.set(device.id)
        return await coroutine

    async def _traffic(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.options.tick_s)
            now = time.monotonic()
            elapsed, last = now - last, now
            for device in self.devices:
                device.serve(elapsed)

    async def _announce(self) -> None:
        while sum(1 for d in self.devices if d.link and d.link.transport.connected) < len(self.devices):
            await asyncio.sleep(0.1)
        print(f"simulate: {len(self.devices)} devices connected to {self.options.broker} "
              f"in {time.monotonic() - self.started:.1f} s", flush=True)

    def _write_status(self) -> None:
        from edgepack.atomic import write_json_atomic

        devices = {d.id: d.status() for d in self.devices}
        write_json_atomic(self.options.status, {
            "count": len(devices), "ready": sum(1 for s in devices.values() if s["online"]),
            "uptime_s": round(time.monotonic() - self.started, 1), "updated": time.time(),
            "stopping": self.stopping, "devices": devices})

    async def _status_loop(self) -> None:
        while True:
            try:
                self._write_status()
            except Exception:  # noqa: BLE001 - a status file is not worth stopping the fleet for
                log.exception("status file not written")
            await asyncio.sleep(1.0)


class _PollSelect:
    """``select.select`` for paho on poll(2). paho waits on its socket (and a socket pair) with select(),
    which takes no file descriptor above FD_SETSIZE (1024): a process of 200 agents, each with its spool's
    SQLite files, passes that, and every client whose socket lands above it loses its connection at once
    (paho reads the ValueError as a lost connection). poll has no such limit."""

    error = OSError

    @staticmethod
    def select(rlist, wlist, xlist, timeout=None):
        import select as _select

        poller = _select.poll()
        wanted: dict[int, int] = {}
        objects: dict[int, object] = {}
        for flag, items in ((_select.POLLIN, rlist), (_select.POLLOUT, wlist)):
            for item in items:
                fd = item if isinstance(item, int) else item.fileno()  # TypeError on None, as select()
                if fd < 0:
                    raise ValueError("file descriptor cannot be a negative integer")
                wanted[fd] = wanted.get(fd, 0) | flag
                objects[fd] = item
        for fd, flags in wanted.items():
            poller.register(fd, flags)
        events = poller.poll(None if timeout is None else max(0.0, timeout) * 1000)
        readable, writable = [], []
        failed = _select.POLLERR | _select.POLLHUP | _select.POLLNVAL
        for fd, event in events:
            if event & (_select.POLLIN | failed) and wanted[fd] & _select.POLLIN:
                readable.append(objects[fd])
            if event & (_select.POLLOUT | failed) and wanted[fd] & _select.POLLOUT:
                writable.append(objects[fd])
        return readable, writable, []


def _paho_without_fd_limit() -> None:
    import paho.mqtt.client as paho_client

    paho_client.select = _PollSelect


def _raise_file_limit(devices: int) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(soft, min(hard, 64 + 16 * devices)) if hard != resource.RLIM_INFINITY else max(soft, 64 + 16 * devices)
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


def simulate(options: Options) -> int:
    """Run the simulation until SIGTERM/SIGINT or ``duration_s``; the process exit code."""
    from agent.logs import setup_logging

    setup_logging(options.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DeviceField())
    _raise_file_limit(options.count)
    _paho_without_fd_limit()
    simulation = Simulation(options)
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(simulation.run())
    return asyncio.run(simulation.run())


def status_json(path: Path) -> dict:
    """The status file (for scripts and tests)."""
    return json.loads(Path(path).read_text())
