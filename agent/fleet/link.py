"""The daemon's link to the fleet: the MQTT transport, the telemetry spool and its sender, the
retained state, events, and the updater. Everything here runs on the daemon's event loop; the
transport's thread only hands events over (``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid

from edgepack.errors import UsageError
from edgepack.fleet import topics

from .spool import Spool
from .telemetry import TelemetryCollector
from .transport import Transport
from .updater import Updater

log = logging.getLogger("edgepack.agent.fleet")


def device_id(config) -> str:
    """``device_id`` from agent.yaml, else the host name; checked as one MQTT topic level."""
    value = config.device_id or socket.gethostname().split(".")[0]
    return topics.check_id("device", value)


class FleetLink:
    """Connects one daemon to the fleet broker (only when ``mqtt`` is configured)."""

    def __init__(self, config, registry, metrics):
        self.config = config
        self.registry = registry
        self.store = registry.store
        self.device = device_id(config)
        self.boot = uuid.uuid4().hex[:12]
        self.spool = Spool(config.telemetry.spool or self.store.root / "spool.sqlite",
                           config.telemetry.max_messages, config.telemetry.max_bytes)
        self.metrics = metrics
        self.collector = TelemetryCollector(metrics, registry, self.store)
        self.transport: Transport | None = None
        self.updater: Updater | None = None
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._acked: list[int] = []  # acknowledged, not yet deleted from the spool
        self._sent_upto = 0
        self._wake_sender = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue = asyncio.Queue()
        self.handlers: dict[str, object] = {}  # extra topic -> callback(topic, payload) (streaming)

    # -- messages out ------------------------------------------------------------------------------

    def _envelope(self, kind: str, body: dict, seq: int) -> dict:
        return {"schema": topics.SCHEMA, "kind": kind, "device": self.device, "boot": self.boot, "seq": seq,
                "ts": time.time(), **body}

    def emit(self, kind: str, body: dict) -> int:
        """Spool an event (update progress, a refusal, drift) for the events topic; its sequence number."""
        seq = self.spool.add("event", topics.events(self.device),
                             lambda seq, dropped: self._envelope("event", {"event": kind, **body}, seq))
        self._wake()
        return seq

    def _wake(self) -> None:
        """Wake the sender, from the loop or from a worker thread (asyncio.Event is not thread-safe)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wake_sender.set()
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_sender.set)

    def telemetry(self) -> int:
        body = self.collector.collect({"spool": self.spool.stats()})

        def build(seq, dropped):
            return self._envelope("telemetry", {**body, "dropped": dropped}, seq)

        seq = self.spool.add("telemetry", topics.telemetry(self.device), build)
        self._wake()
        return seq

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
            }
        return json.dumps({"schema": topics.SCHEMA, "device": self.device, "boot": self.boot, "online": online,
                           "profile": self.config.profile, "ts": time.time(), "models": models}).encode()

    def publish_state(self) -> None:
        if self.transport:
            self.transport.publish(topics.state(self.device), self.state_payload(), qos=1, retain=True)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        mqtt = self.config.mqtt
        offline = json.dumps({"schema": topics.SCHEMA, "device": self.device, "online": False}).encode()
        self.transport = Transport(mqtt, self.device, self._deliver, will=(topics.state(self.device), offline))
        self._offline = offline
        if self.config.updates.enabled:
            if not self.registry.keys:
                raise UsageError("updates over MQTT need trusted_keys in agent.yaml (the agent refuses "
                                 "unsigned updates); add the fleet's public key or set updates.enabled: false")
            self.updater = Updater(self.config, self.registry, self.device, self.transport.publish, self.emit)
            for topic in self.updater.topics():
                self.transport.subscribe(topic, 1)
        from .streaming import StreamServer

        self.streams = StreamServer(self.config, self.registry, self.metrics, self)
        for topic in self.handlers:
            self.transport.subscribe(topic, 1)
        self.store.listeners.append(self._on_transition)
        self.registry.event_listeners.append(self.emit)
        self.transport.start()
        if self.updater:
            self.updater.start()
        self._tasks = [asyncio.ensure_future(self._dispatch()), asyncio.ensure_future(self._sender()),
                       asyncio.ensure_future(self._ticker())]
        log.info("fleet link started", extra={"device": self.device, "broker": f"{mqtt.host}:{mqtt.port}",
                                              "updates": bool(self.updater)})

    async def close(self) -> None:
        self.telemetry()  # the last figures go to the spool; sent next time if not now
        if self.transport and self.transport.connected:
            await self._drain(2.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.updater:
            await self.updater.close()
        if self.transport:
            transport, last = self.transport, (topics.state(self.device), self._offline)
            await asyncio.get_running_loop().run_in_executor(None, transport.stop, last)
        if self._on_transition in self.store.listeners:
            self.store.listeners.remove(self._on_transition)
        if self.emit in self.registry.event_listeners:
            self.registry.event_listeners.remove(self.emit)
        self.spool.close()

    async def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.spool.stats()["pending"] and time.monotonic() < deadline:
            self._wake_sender.set()
            await asyncio.sleep(0.05)

    # -- from the transport thread -----------------------------------------------------------------

    def _deliver(self, event: tuple) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def _on_transition(self, name: str, entry: dict, state: dict) -> None:
        # Called from the store (on a worker thread): spool the event, then publish the state.
        target = (state["update"].get("target") or {})
        step = {("step" if key == "event" else key): value for key, value in entry.items()}
        log.info("update step", extra={"model": name, "version": target.get("version"), **step})
        self.emit("update", {"model": name, "version": target.get("version"), **step})
        if self._loop:
            self._loop.call_soon_threadsafe(self.publish_state)

    async def _dispatch(self) -> None:
        while True:
            event = await self._events.get()
            try:
                self._handle(event)
            except Exception:  # noqa: BLE001 - a bad message must not stop the link
                log.exception("fleet message handling failed")

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "connected":
            log.info("mqtt connected", extra={"session_present": event[1]})
            self._inflight.clear()
            self._sent_upto = 0  # resend whatever is still spooled, in order
            self.publish_state()
            self._wake_sender.set()
            if self.updater:
                self.updater.session_lost = self.updater.session_lost or not event[1]
                self.updater.connected.set()
        elif kind == "disconnected":
            log.warning("mqtt disconnected", extra={"reason": event[1]})
            if self.updater:
                self.updater.connected.clear()
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
            _, topic, payload, _retained = event
            if self.updater and topic == topics.chunk_data(self.device):
                self.updater.handle_chunk(payload)
            elif self.updater and topic in self.updater.topics():
                self.updater.handle_desired(topic, payload)
            elif topic in self.handlers:
                self.handlers[topic](topic, payload)

    # -- sending -----------------------------------------------------------------------------------

    def _flush_acks(self) -> None:
        acked, self._acked = self._acked, []
        self.spool.ack(acked)
        self._wake_sender.set()

    async def _sender(self) -> None:
        window = self.config.mqtt.max_inflight
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
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

    async def _ticker(self) -> None:
        interval = self.config.telemetry.interval_s
        while True:
            await asyncio.sleep(interval)
            self.telemetry()
