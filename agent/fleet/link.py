"""The daemon's link to the fleet: the MQTT transport, the telemetry spool and its sender, the
retained state, events, and the updater. Everything here runs on the daemon's event loop; the
transport's thread only hands events over (``loop.call_soon_threadsafe``), and the spool's fsynced
writes run on the spool writer's thread.

Liveness: nothing here may stop serving. Every periodic task survives any exception (logged, counted
in ``edgepack_background_failures_total``, backed off); :meth:`FleetLink.emit` never raises (a
message that cannot be spooled, on a full disk, is counted and reported in the next telemetry).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import socket
import time
import uuid

from edgepack.atomic import write_json_atomic
from edgepack.bundle.signing import load_public_key
from edgepack.errors import UsageError
from edgepack.fleet import topics

from ..updates.updater import Updater
from .spool import SpoolWriter, open_spool
from .telemetry import TelemetryCollector
from .transport import Transport

log = logging.getLogger("edgepack.agent.fleet")


def device_id(config) -> str:
    """``device_id`` from agent.yaml, else the host name; checked as one MQTT topic level."""
    value = config.device_id or socket.gethostname().split(".")[0]
    return topics.check_id("device", value)


async def survive(name: str, interval: float, work, metrics, max_backoff: float = 300.0) -> None:
    """Run ``work()`` (sync or async) every ``interval`` seconds for ever; an exception is logged and
    counted, and the next try waits longer (doubling, with jitter, up to ``max_backoff``)."""
    delay = interval
    while True:
        await asyncio.sleep(delay)
        try:
            result = work()
            if asyncio.iscoroutine(result):
                await result
            delay = interval
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a periodic task must outlive anything the disk or a peer does
            metrics.loop_failures.labels(name).inc()
            log.exception(f"{name} failed; trying again")
            delay = min(max(delay * 2, interval), max_backoff) * random.uniform(0.75, 1.0)


def next_boot_number(root) -> tuple[int | None, str | None]:
    """(boot number, store id): one more than the number this store's agent last started with,
    recorded before it is used (a crash between never reuses one), and the random id of this store's
    count (a re-flashed or damaged store starts a new count under a new id, so the controller does not
    compare it with the old one). (None, None) when the store cannot be written."""
    import secrets
    from pathlib import Path

    path = Path(root) / "boots.json"
    try:
        record = json.loads(path.read_text())
        last, store = int(record["boots"]), str(record["store"])
        if not 0 <= last < 2 ** 31 - 1 or not store:
            raise ValueError("out of range")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        last, store = 0, secrets.token_hex(8)  # none yet, or damaged: a new count
    try:
        write_json_atomic(path, {"boots": last + 1, "store": store})
    except OSError:
        return None, None
    return last + 1, store


class FleetLink:
    """Connects one daemon to the fleet broker (only when ``mqtt`` is configured)."""

    def __init__(self, config, registry, metrics, service=None):
        self.config = config
        #: the daemon's dataplane (streamed requests go through it as HTTP ones do)
        self.service = service
        self.streams = None
        self.registry = registry
        self.store = registry.store
        self.device = device_id(config)
        self.boot = uuid.uuid4().hex[:12]
        #: how many times this store's agent started: orders the states of two boots when the clock
        #: cannot (a device without a real-time clock boots with its clock behind)
        self.boot_n, self.boot_store = next_boot_number(self.store.root)
        self.metrics = metrics
        self.spool, aside = open_spool(config.telemetry.spool or self.store.root / "spool.sqlite",
                                       config.telemetry.max_messages, config.telemetry.max_bytes)
        self.writer = SpoolWriter(self.spool, self._spooled, self._spool_failed)
        self.unspooled = 0  # messages that could not be written (a full disk), reported in telemetry
        self.collector = TelemetryCollector(metrics, registry, self.store)
        self.transport: Transport | None = None
        self.updater: Updater | None = None
        self.link_state: dict = {"connected": False}
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._acked: list[int] = []  # acknowledged, not yet handed to the writer
        self._sent_upto = 0
        self._wake_sender = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: events from the transport thread, handled on the loop in bursts (see ``_deliver``)
        self._events: collections.deque = collections.deque()
        self._wake_pending = False
        self._have_events = asyncio.Event()
        if aside:
            self.emit("spool_reset", {"message": f"the telemetry spool was damaged; moved to {aside} and a new one "
                                      "started (messages spooled in it were not sent)", "aside": str(aside)})

    # -- messages out ------------------------------------------------------------------------------

    def _envelope(self, kind: str, body: dict, seq: int) -> dict:
        return {"schema": topics.SCHEMA, "kind": kind, "device": self.device, "boot": self.boot, "seq": seq,
                "ts": time.time(), **body}

    def emit(self, kind: str, body: dict) -> None:
        """Spool an event (update progress, a refusal, drift) for the events topic. Never raises."""
        try:
            ts = time.time()
            self.writer.add("event", topics.events(self.device),
                            lambda seq, dropped: {**self._envelope("event", {"event": kind, **body}, seq), "ts": ts})
        except Exception:  # noqa: BLE001 - reporting must never break what it reports on
            self.unspooled += 1
            log.exception("event not spooled", extra={"event": kind})

    def _spooled(self) -> None:
        """Called by the writer thread after each batch: wake the sender on the loop."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._wake_sender.set)
            except RuntimeError:
                pass

    def _spool_failed(self, exc: Exception, lost: int) -> None:
        self.unspooled += lost
        self.metrics.loop_failures.labels("spool").inc()
        log.error("telemetry spool write failed", extra={"error": str(exc), "lost": lost})

    def telemetry(self) -> None:
        extra = {"spool": self.spool.stats(), "link": self.link_state}
        if self.streams:
            extra["stream_link"] = {**self.streams.connection.state, "dropped": self.streams.connection.dropped}
        if self.updater and self.updater.progress:
            extra["downloads"] = dict(self.updater.progress)
        if self.updater:
            stale = self.updater.check_stale()
            if stale:
                extra["desired_stale"] = stale
        if self.unspooled:
            extra["unspooled"], self.unspooled = self.unspooled, 0
        body = self.collector.collect(extra)
        ts = time.time()

        def build(seq, dropped):
            return {**self._envelope("telemetry", {**body, "dropped": dropped}, seq), "ts": ts}

        self.writer.add("telemetry", topics.telemetry(self.device), build)

    def state_payload(self, online: bool = True) -> bytes:
        models = {}
        for name in self.store.model_names(with_empty=True):
            try:
                state = self.store.state(name)
            except Exception:  # noqa: BLE001 - reported as unreadable
                models[name] = {"error": "state unreadable"}
                continue
            slots = state.get("slots", {})
            models[name] = {
                "active": slots.get(state.get("active") or "", {}).get("version"),
                "previous": slots.get(state.get("previous") or "", {}).get("version"),
                "update": {k: state["update"].get(k) for k in ("state", "result", "reason", "since")},
                "target": (state["update"].get("target") or {}).get("version"),
                # which signed desired state the update came from: the fleet matches a result to its offer
                "desired_version": (state["update"].get("target") or {}).get("desired_version"),
            }
            scheduler = self.registry.schedulers.get(name)
            # What this daemon really serves: it differs from "active" while a version the store names
            # failed to load here (the old one keeps serving).
            models[name]["serving"] = scheduler.current.version if scheduler and scheduler.current else None
            if name in self.registry.failures and models[name]["serving"] != models[name]["active"]:
                models[name]["load_error"] = self.registry.failures[name]
            if state.get("local"):
                models[name]["local"] = state["local"]  # an operator's install/rollback holds
            if self.updater and name in self.updater.progress:
                models[name]["download"] = self.updater.progress[name]
            shadow = getattr(scheduler, "shadow", None) if scheduler else None
            failure = self.updater.shadow_failure(name) if self.updater else None
            if shadow is not None:
                models[name]["shadow"] = {"version": shadow.version, "state": shadow.state,
                                          "fleet": shadow.fleet_sha256 is not None}
            elif failure:
                wanted = (self.updater.record["wanted"].get(name) or {}).get("shadow") or {}
                models[name]["shadow"] = {"version": wanted.get("version"), "state": "failed",
                                          "reason": failure.get("message")}
        body = {"schema": topics.SCHEMA, "device": self.device, "boot": self.boot, "boot_n": self.boot_n,
                "boot_store": self.boot_store, "online": online,
                # what this agent's desired-state parser takes beyond the first schema
                "accepts": ["renews", "shadow"],
                "profile": self.config.profile, "ts": time.time(), "models": models,
                # the group desired-state topics this device follows (the controller authorises chunk
                # requests by them and targets rollouts by them)
                "groups": list(self.config.updates.groups)}
        if self.updater and self.updater.blocked:
            body["updates_blocked"] = self.updater.blocked
        return json.dumps(body).encode()

    def publish_state(self) -> None:
        if self.transport:
            try:
                self.transport.publish(topics.state(self.device), self.state_payload(), qos=1, retain=True)
            except Exception:  # noqa: BLE001 - the next change publishes it again
                log.exception("state not published")

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        mqtt = self.config.mqtt
        # The boot says which connection's will it is: the controller ignores a will of a boot the
        # device has since left (a reboot whose new state arrived first).
        offline = json.dumps({"schema": topics.SCHEMA, "device": self.device, "boot": self.boot, "online": False}).encode()
        self.transport = Transport(mqtt, self.device, self._deliver, will=(topics.state(self.device), offline))
        self._offline = offline
        if self.config.updates.enabled:
            if not self.registry.keys or not self.config.fleet_keys:
                raise UsageError("updates over MQTT need trusted_keys (the build keys bundles are signed with) and "
                                 "fleet_keys (the keys desired states are signed with) in agent.yaml; add them or "
                                 "set updates.enabled: false")
            fleet_keys = [load_public_key(path) for path in self.config.fleet_keys]
            self.updater = Updater(self.config, self.registry, self.device, self.transport.publish, self.emit, fleet_keys)
            self.updater.state_changed = self.publish_state
            for topic in self.updater.topics():
                self.transport.subscribe(topic, 1)
        if any(model.stream for model in self.config.models):
            from ..serving.mqtt_stream import StreamServer

            if self.service is None:
                from ..serving.codec import Codec
                from ..serving.dataplane import InferenceService

                server = self.config.server
                self.service = InferenceService(self.config, self.registry, self.metrics,
                                                Codec(server.offload_bytes, server.max_body_bytes, server.decode_helpers))
            self.streams = StreamServer(self.config, self.service, self)
            self.streams.start()
        self.store.listeners.append(self._on_transition)
        self.registry.event_listeners.append(self.emit)
        self.transport.start()
        if self.updater:
            self.updater.start()
        self._tasks = [asyncio.ensure_future(self._dispatch()), asyncio.ensure_future(self._sender()),
                       asyncio.ensure_future(survive("telemetry", self.config.telemetry.interval_s, self.telemetry,
                                                     self.metrics))]
        log.info("fleet link started", extra={"device": self.device, "broker": f"{mqtt.host}:{mqtt.port}",
                                              "protocol": mqtt.protocol, "updates": bool(self.updater)})

    async def close(self) -> None:
        try:
            self.telemetry()  # the last figures go to the spool; sent next time if not now
        except Exception:  # noqa: BLE001
            log.exception("last telemetry not spooled")
        await asyncio.get_running_loop().run_in_executor(None, self.writer.flush, 5.0)
        if self.transport and self.transport.connected:
            await self._drain(2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.streams:
            await self.streams.close()
        if self.updater:
            await self.updater.close()
        if self.transport:
            transport, last = self.transport, (topics.state(self.device), self._offline)
            await asyncio.get_running_loop().run_in_executor(None, transport.stop, last)
        if self._on_transition in self.store.listeners:
            self.store.listeners.remove(self._on_transition)
        if self.emit in self.registry.event_listeners:
            self.registry.event_listeners.remove(self.emit)
        if self._acked:
            self.writer.ack(self._acked)
            self._acked = []
        await asyncio.get_running_loop().run_in_executor(None, self.writer.close, 5.0)
        self.spool.close()

    async def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.spool.stats()["pending"] and time.monotonic() < deadline:
            self._wake_sender.set()
            await asyncio.sleep(0.05)

    # -- from the transport thread -----------------------------------------------------------------

    def _deliver(self, event: tuple) -> None:
        # One wake-up per burst, not per event: call_soon_threadsafe writes to the loop's self-pipe (a
        # syscall and a loop iteration each), and a stream at a few thousand messages a second brings two
        # events per request (the message, the reply's puback). The flag is cleared on the loop before
        # it takes the events, so an event appended after that always schedules another round.
        self._events.append(event)
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._have_events.set)

    def _on_transition(self, name: str, entry: dict, state: dict) -> None:
        # Called from the store (on a worker thread): spool the event, then publish the state.
        target = (state["update"].get("target") or {})
        step = {("step" if key == "event" else key): value for key, value in entry.items()}
        log.info("update step", extra={"model": name, "version": target.get("version"), **step})
        self.emit("update", {"model": name, "version": target.get("version"), **step})
        if self._loop:
            self._loop.call_soon_threadsafe(self.publish_state)

    async def _dispatch(self) -> None:
        # A task (not a callback), so that cancelling the link's tasks stops its handling too.
        while True:
            await self._have_events.wait()
            self._have_events.clear()
            self._wake_pending = False
            # Only what is queued now: a later event has woken another round, so a busy link never
            # holds the loop.
            for _ in range(len(self._events)):
                event = self._events.popleft()
                try:
                    self._handle(event)
                except Exception:  # noqa: BLE001 - a bad message must not stop the link
                    self.metrics.loop_failures.labels("dispatch").inc()
                    log.exception("fleet message handling failed")
                finally:
                    if event[0] == "message" and self.transport:
                        self.transport.delivered()

    def _link_changed(self, state: dict) -> None:
        self.link_state = {k: state.get(k) for k in ("connected", "protocol", "attempts", "failures", "last_error", "since")}
        for protocol in ("5", "3.1.1"):
            self.metrics.mqtt_connected.labels(protocol).set(1 if state.get("connected") and state.get("protocol") == protocol else 0)
        try:
            # For 'edgepack-agent status' (another process): how the link stands, at most once a second.
            now = time.monotonic()
            if now - getattr(self, "_link_written", 0.0) >= 1.0 or state.get("connected"):
                self._link_written = now
                write_json_atomic(self.store.root / "fleet" / "link.json",
                                  {**self.link_state, "device": self.device, "broker": f"{self.config.mqtt.host}:{self.config.mqtt.port}",
                                   "pid": __import__("os").getpid(), "updated": time.time()})
        except Exception:  # noqa: BLE001 - a status file is not worth failing for
            pass

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "connected":
            log.info("mqtt connected", extra={"session_present": event[1], "protocol": self.transport.protocol})
            self._link_changed(self.transport.state)
            self._inflight.clear()
            self._sent_upto = 0  # resend whatever is still spooled, in order
            self.publish_state()
            self._wake_sender.set()
            if self.updater:
                self.updater.session_lost = self.updater.session_lost or not event[1]
                self.updater.connected.set()
        elif kind == "disconnected":
            log.warning("mqtt disconnected", extra={"reason": event[1]})
            self._link_changed({**self.transport.state, "connected": False})
            if self.updater:
                self.updater.connected.clear()
        elif kind == "link":
            self.metrics.mqtt_failures.labels(event[2]).inc()
            self._link_changed(event[1])
        elif kind == "dropped":
            self.metrics.dropped_messages.labels(event[2]).inc()
            log.warning("mqtt message dropped", extra={"topic": event[1], "reason": event[2]})
        elif kind == "puback":
            seq = self._inflight.pop(event[1], None)
            if seq is not None and event[2]:
                # Refused (quota, not authorized): it stays spooled and goes again after a reconnect.
                log.warning("broker refused a message", extra={"seq": seq, "reason": event[2]})
            elif seq is not None:
                # Acks that arrive together are deleted in one transaction (one fsync, not one each).
                if not self._acked:
                    self._loop.call_soon(self._flush_acks)
                self._acked.append(seq)
        elif kind == "message":
            topic, payload = event[1], event[2]
            if self.updater and topic == topics.chunk_data(self.device):
                self.updater.handle_chunk(payload)
            elif self.updater and topic in self.updater.topics():
                self.updater.handle_desired(topic, payload)

    # -- sending -----------------------------------------------------------------------------------

    def _flush_acks(self) -> None:
        acked, self._acked = self._acked, []
        self.writer.ack(acked)  # deleted on the writer thread, batched
        self._wake_sender.set()  # the window has room now; sending does not wait for the delete

    async def _sender(self) -> None:
        window = self.config.mqtt.max_inflight
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            try:
                if not self.transport.connected:
                    continue
                room = window - len(self._inflight)
                if room <= 0:
                    continue
                for seq, topic, payload in self.spool.pending(self._sent_upto, room):
                    mid = self.transport.publish(topic, payload, qos=1)
                    if mid is None:
                        break
                    self._inflight[mid] = seq
                    self._sent_upto = seq
            except Exception:  # noqa: BLE001 - the sender must outlive a disk error; the next wake retries
                self.metrics.loop_failures.labels("sender").inc()
                log.exception("telemetry sender failed")
                await asyncio.sleep(1.0)
                self._wake_sender.set()
