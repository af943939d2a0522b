"""The fleet controller: ``edgepack fleet serve`` records device state, telemetry and events, answers
bundle chunk requests and advances rollouts; ``edgepack fleet push`` signs and publishes one desired state.

Nothing is lost: a device message is acknowledged to the broker (paho ``manual_ack``) only after the
database transaction holding it has committed, so a stop, a crash or a database outage leaves it with
the broker, which delivers it again (it is then stored once: messages are unique per device, boot and
seq). paho's thread only hands messages to bounded queues; one writer thread stores them in batches,
a small pool answers chunk requests (authorised and rate-limited per device), and a tick thread
advances rollouts (:mod:`.rollouts`) under a database lease, so one controller of several does it.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from edgepack.bundle.format import sha256_file
from edgepack.errors import UsageError

from . import chunks, topics
from .nodelay import no_delay
from .registry import FleetRegistry
from .releases import BundleShelf

log = logging.getLogger("edgepack.fleet")


@dataclass
class Broker:
    """Where the broker is and how to log in."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    #: "auto" (MQTT 5, else 3.1.1), "5" or "3.1.1"
    protocol: str = "auto"

    @classmethod
    def from_url(cls, url: str, **options) -> "Broker":
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise UsageError(f"--broker {url!r}: give mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        tls = parsed.scheme == "mqtts"
        return cls(parsed.hostname, parsed.port or (8883 if tls else 1883), tls,
                   parsed.username or options.get("username"), parsed.password or options.get("password"),
                   options.get("ca_file"), options.get("cert_file"), options.get("key_file"),
                   options.get("protocol") or "auto")

    def negotiate(self, timeout: float = 5.0) -> str:
        """The protocol to use: with ``auto``, MQTT 5 when the broker answers an MQTT 5 CONNECT, else
        3.1.1 (a broker without MQTT 5 refuses it or closes the socket without a CONNACK). Fixed
        afterwards, so every later connection of this process uses the same one."""
        if self.protocol != "auto":
            return self.protocol
        import paho.mqtt.client as mqtt

        answered = threading.Event()
        outcome: list = []
        probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgepack-probe-{time.monotonic_ns()}",
                            protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        self._auth(probe)

        def connected(client, userdata, flags, reason_code, properties=None):
            # Any answer but "unsupported protocol version" means the broker speaks MQTT 5 (a refused
            # login then shows as itself on the real connection, not as a protocol problem).
            outcome.append(not reason_code.is_failure or reason_code.value not in (1, 132))
            answered.set()

        probe.on_connect = connected
        probe.on_disconnect = lambda *args: answered.set()
        try:
            probe.connect(self.host, self.port, keepalive=30, clean_start=True)
        except OSError as exc:
            raise UsageError(f"cannot reach the broker at {self.host}:{self.port} ({exc.strerror or exc}); "
                             "check --broker") from None
        probe.loop_start()
        answered.wait(timeout)
        probe.disconnect()
        probe.loop_stop()
        self.protocol = "5" if outcome and outcome[0] else "3.1.1"
        log.info("broker protocol: MQTT %s", self.protocol)
        return self.protocol

    def _auth(self, client) -> None:
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls or self.ca_file or self.cert_file:
            client.tls_set(ca_certs=self.ca_file, certfile=self.cert_file, keyfile=self.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)

    def client(self, client_id: str, clean: bool = True, manual_ack: bool = False):
        """A paho client for the negotiated protocol (3.1.1: ``clean`` is its clean-session flag)."""
        import paho.mqtt.client as mqtt

        if self.negotiate() == "5":
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                                 manual_ack=manual_ack)
        else:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                 clean_session=clean, manual_ack=manual_ack)
        self._auth(client)
        return client

    def connect_kwargs(self, persistent: bool = False, receive_maximum: int | None = None) -> dict:
        """Keyword arguments of ``connect``/``connect_async`` for the negotiated protocol."""
        if self.negotiate() != "5":
            return {}
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if not persistent:
            return {"clean_start": True}
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 7 * 24 * 3600
        if receive_maximum:
            properties.ReceiveMaximum = receive_maximum
        return {"clean_start": False, "properties": properties}


#: what ``--share`` splits between controllers. ``chunks``: each chunk request is answered by one
#: controller; telemetry and events go to every controller, which store each message once (unique per
#: device, boot and seq). Mosquitto 2.0.11 hands shared messages round-robin to every session of the
#: share, a dead controller's included, and keeps them there until it returns: a chunk request is only
#: asked again, but telemetry would wait for the dead controller. ``all``: for brokers that dispatch
#: shared messages to connected members only (EMQX, HiveMQ): ingestion is split too.
SHARE = {"none": (), "chunks": ("chunks/req",), "all": ("telemetry", "events", "chunks/req")}


try:  # a well-kept C parser, 3-5x the standard library's speed (the agent's HTTP stack ships it already)
    import orjson as _orjson
except ImportError:  # pragma: no cover - the fleet extra installs it
    _orjson = None


def _finite(text: str):
    value = float(text)
    return value if value - value == 0 else None  # inf and nan are not numbers a database stores


def _transient(exc: Exception) -> bool:
    """Whether a database error may pass by itself (the server away, a lock) rather than being about
    the data."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, OperationalError):
        text = str(exc).lower()
        return not ("too large" in text or "out of range" in text or "overflow" in text)
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def default_client_id() -> str:
    """Stable per machine (a restart resumes the broker session and what it queued), different
    between machines (two controllers never take over each other's session)."""
    return f"edgepack-fleet-{socket.gethostname().split('.')[0]}"[:64]


class TokenBucket:
    """Chunks a device may still be sent: ``rate`` per second, at most ``burst`` at once."""

    __slots__ = ("tokens", "at")

    def __init__(self, burst: float):
        self.tokens, self.at = burst, time.monotonic()

    def take(self, wanted: int, rate: float, burst: float) -> int:
        now = time.monotonic()
        self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted


class FleetController:
    """Subscribes to every device's topics; records what they say, serves bundle chunks, and (with a
    fleet ``signing_key``) advances rollouts."""

    #: messages waiting for the writer (then paho's thread waits: TCP pushes back on the broker)
    INBOX = 20_000
    #: messages stored per transaction at most
    BATCH = 1000
    #: chunk requests waiting for a worker; more are dropped (the device asks again on its time-out)
    CHUNK_QUEUE = 256
    #: a chunk sent to a device is not sent to it again for this long (it is queued on the way); below
    #: the agent's default chunk time-out (10 s), so a frame really lost is sent at the first ask again
    RESEND_AFTER_S = 8.0
    #: chunk frames kept ready (the bundles of the rollouts under way)
    FRAME_CACHE_BYTES = 64 * 1024 * 1024
    #: messages paho sends before their PUBACKs and holds queued behind them: what chunk frames can make
    #: the controller hold is bounded by these (a frame refused as "queue full" is asked again)
    MQTT_IN_FLIGHT = 64
    MQTT_QUEUED = 256

    def __init__(self, broker: Broker, db_url: str | None, bundles: Path, client_id: str | None = None,
                 signing_key=None, tick_s: float = 2.0, share: str = "none", chunk_workers: int = 4,
                 chunk_rate: float = 256.0, chunk_burst: float = 512.0, keep_raw_s: float = 7 * 86400,
                 keep_rollups_s: float = 90 * 86400, bundle_url: str | None = None, role: str = "all",
                 ingest_share: str | None = None, retire: bool = False):
        self.broker = broker
        #: an ingest worker of a controller that now runs fewer: take what the broker queued for this
        #: session, store it, then end the session (the broker no longer hands it a share)
        self.retire = retire
        self.last_message = time.monotonic()
        #: messages handed to the writer and not yet stored and acknowledged
        self.taken = 0
        self._taken_lock = threading.Lock()
        self.late = False  # a message came while closing (left with the broker, unacknowledged)
        #: a retiring worker ended its session (everything it took was stored and acknowledged)
        self.retired = False
        #: "all" (one process does everything), "control" (telemetry and events are left to ingest
        #: workers) or "ingest" (an ingest worker: stores its share of telemetry and events, nothing else)
        self.role = role
        #: the shared-subscription group an ingest worker takes its share from
        self.ingest_share = ingest_share
        #: base URL of an HTTP(S) copy of the shelf (``<url><sha256>.edgepack``) named in rollout offers
        self.bundle_url = bundle_url
        self.registry = FleetRegistry(db_url)
        self.shelf = BundleShelf(bundles)
        self.client_id = client_id or default_client_id()
        self.client = broker.client(self.client_id, clean=False, manual_ack=True)
        self.inbox: queue.Queue = queue.Queue(self.INBOX)
        self.signing_key = signing_key
        self.tick_s = tick_s
        if share not in SHARE:
            raise UsageError(f"--share {share!r}: give one of {', '.join(SHARE)}")
        #: the leaves split between controllers by MQTT 5 shared subscriptions (3.1.1 has none)
        self.shared_leaves = SHARE[share] if broker.negotiate() == "5" else ()
        self.chunk_rate, self.chunk_burst = chunk_rate, chunk_burst
        self.keep_raw_s, self.keep_rollups_s = keep_raw_s, keep_rollups_s
        self.chunks_sent = 0
        self.bytes_sent = 0
        #: (device, bundle sha256) -> chunks sent: what each device downloaded
        self.sent_to: dict[tuple[str, str], int] = {}
        self.chunks_refused = 0
        self.chunks_dropped = 0
        self.chunks_repeated = 0  # asked again while still on the way: not sent twice
        self.refused_messages = 0  # messages no database takes: logged, acknowledged, dropped
        #: False: chunk requests are read and not answered (a controller that cannot serve, in tests)
        self.serve_chunks = True
        #: the bundles each retained desired-state topic names (what a chunk request may ask for)
        self.wanted: dict[str, set[str]] = {}
        self._groups: dict[str, set[str]] = {}
        self._buckets: dict[str, TokenBucket] = {}
        #: (device, sha256, index) -> when that chunk was last sent: a chunk asked again while it is still
        #: on its way (a device's time-out shorter than the queue ahead of it) is not sent twice
        self._recent: dict[tuple[str, str, int], float] = {}
        self._recent_lock = threading.Lock()
        self._frames: dict[tuple[str, int], bytes] = {}
        self._frame_bytes = 0
        self._chunk_pool = ThreadPoolExecutor(max_workers=chunk_workers, thread_name_prefix="fleet-chunks")
        self._chunk_queue = threading.BoundedSemaphore(self.CHUNK_QUEUE)
        self.client.max_inflight_messages_set(self.MQTT_IN_FLIGHT)
        self.client.max_queued_messages_set(self.MQTT_QUEUED)
        self._generation = 0  # connection number: an ack is only sent on the connection that got the message
        self._closing = threading.Event()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.client.on_socket_open = no_delay
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        if role != "ingest":
            for row in self.registry.devices():
                self._groups[row["device"]] = set((row.get("state") or {}).get("groups") or [])

    # -- paho's thread: hand over, never block on the database -------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.error("broker refused the controller: %s", reason_code)
            return
        self._generation += 1
        if self.role == "ingest":
            # an ingest worker: its share of the telemetry and events, split by the broker; ready
            # (``connected``) once the broker confirmed the subscription
            filters = [f"$share/{self.ingest_share}/{topics.PREFIX}/devices/+/{leaf}" for leaf in ("telemetry", "events")]
            if self.retire:
                client.on_unsubscribe = lambda *_: self.connected.set()
                client.unsubscribe(filters)  # what is queued for the session still comes
                return
            client.on_subscribe = self._on_ingest_subscribed
            client.subscribe([(f, 1) for f in filters])
            return
        # Retained states and desired states go to every controller (shared subscriptions get no
        # retained messages, and each controller needs the whole picture); what --share names is split.
        client.subscribe(f"{topics.PREFIX}/devices/+/desired", qos=1)
        client.subscribe(f"{topics.PREFIX}/groups/+/desired", qos=1)
        client.subscribe(f"{topics.PREFIX}/devices/+/state", qos=1)
        for leaf in ("telemetry", "events", "chunks/req") if self.role == "all" else ("chunks/req",):
            share = "$share/edgepack/" if leaf in self.shared_leaves else ""
            client.subscribe(f"{share}{topics.PREFIX}/devices/+/{leaf}", qos=1)
        if self.role == "control":
            # a persistent session of a controller that stored telemetry itself before it had
            # workers still holds those subscriptions: it would go on storing everything too
            client.unsubscribe([f"{share}{topics.PREFIX}/devices/+/{leaf}" for leaf in ("telemetry", "events")
                                for share in ("", "$share/edgepack/")])
        self.connected.set()

    def _on_ingest_subscribed(self, client, userdata, mid, reason_codes, properties=None) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:  # an ACL or a broker without shared subscriptions: telemetry would reach nobody
            log.error("the broker refused the ingest subscription (%s); trying again on reconnect", ", ".join(refused))
            client.disconnect()
            return
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.connected.clear()

    def _on_message(self, client, userdata, message) -> None:
        self.last_message = time.monotonic()
        if self._closing.is_set():
            self.late = True  # a retiring worker must not end a session that still holds this
            return  # not acknowledged: the broker keeps it for the next connection
        topic, payload = message.topic, bytes(message.payload)
        if topic.endswith("/desired"):
            self._note_desired(topic, payload)
            client.ack(message.mid, message.qos)
            return
        parsed = topics.parse_device_topic(topic)
        if not parsed:
            client.ack(message.mid, message.qos)
            return
        device, leaf = parsed
        if leaf == "chunks/req":
            client.ack(message.mid, message.qos)
            if self.serve_chunks:
                if self._chunk_queue.acquire(blocking=False):
                    self._chunk_pool.submit(self._serve_chunks_job, device, payload)
                else:
                    self.chunks_dropped += 1
            return
        if leaf not in ("state", "telemetry", "events"):
            client.ack(message.mid, message.qos)
            return
        with self._taken_lock:
            self.taken += 1
        self.inbox.put((device, leaf, payload, message.mid, message.qos, self._generation))

    def _note_desired(self, topic: str, payload: bytes) -> None:
        named: set[str] = set()
        try:
            document = json.loads(json.loads(payload)["desired"]) if payload else {}
            shadow = document.get("shadow") if isinstance(document.get("shadow"), dict) else {}
            named = {ref["sha256"] for part in (document.get("bundles"), shadow.get("bundles"))
                     for ref in (part or {}).values() if isinstance(ref, dict)}
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # not a desired state: it names nothing
        self.wanted[topic] = named

    # -- the writer thread -------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """Store one message now (tests, tools); the serving path batches instead."""
        parsed = topics.parse_device_topic(topic)
        if not parsed:
            return
        device, leaf = parsed
        if leaf == "chunks/req":
            if self.serve_chunks:
                self._serve_chunks(device, payload)
            return
        item = self._parse(device, leaf, payload)
        if item:
            self.registry.store_batch([item])

    def _parse(self, device: str, leaf: str, payload: bytes):
        """The message as the registry stores it, or None for one that can never be stored (dropped,
        acknowledged): not JSON, not an object. NaN, Infinity and numbers too large for a float become
        null here, so no database refuses the body.

        The common case — strict JSON, as agents send — is parsed by orjson and stored as the very
        text that came (no re-encoding); anything orjson refuses (NaN, a float out of range, a BOM, a
        lone surrogate) takes the standard library's lenient path and is stored re-encoded."""
        message, text = None, None
        if _orjson is not None:
            try:
                message = _orjson.loads(payload)
                text = payload.decode() if isinstance(payload, (bytes, bytearray)) else str(payload)
            except (_orjson.JSONDecodeError, UnicodeDecodeError, TypeError):
                message, text = None, None
        if text is None:
            try:
                message = json.loads(payload, parse_constant=lambda _: None, parse_float=_finite)
            except (ValueError, RecursionError, TypeError):
                log.warning("not JSON from %s on %s", device, leaf)
                return None
        if not isinstance(message, dict):
            return None
        if leaf == "state" and "models" in message:
            groups = message.get("groups")
            self._groups[device] = {g for g in groups if isinstance(g, str)} if isinstance(groups, list) else set()
        return device, leaf, message, text

    def _write(self, until: threading.Event) -> None:
        delay = 0.5
        while True:
            try:
                first = self.inbox.get(timeout=0.2)
            except queue.Empty:
                if until.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < self.BATCH:
                try:
                    batch.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            items = []
            for device, leaf, payload, *_ in batch:
                try:
                    items.append(self._parse(device, leaf, payload))
                except Exception:  # noqa: BLE001 - one odd message must not stop the writer
                    log.exception("a message from %s could not be read; dropped", device)
            items = [i for i in items if i]
            while True:
                try:
                    self.registry.store_batch(items)
                    delay = 0.5
                    break
                except Exception as exc:  # noqa: BLE001 - classified below
                    if not _transient(exc):
                        # Something in the batch no database takes (a value out of range): store the
                        # messages one by one and drop (log, acknowledge) only the ones refused, so one
                        # poisoned message cannot block every later one, also after a restart.
                        self._store_one_by_one(items)
                        break
                    log.exception("storing %d messages failed; trying again in %.1f s", len(batch), delay)
                    if until.wait(delay) and self._closing.is_set():
                        return  # unacknowledged: the broker delivers them to the next controller session
                    delay = min(delay * 2, 10.0)
            for *_, mid, qos, generation in batch:
                if generation == self._generation:
                    self.client.ack(mid, qos)
            with self._taken_lock:
                self.taken -= len(batch)

    def _store_one_by_one(self, items: list) -> None:
        for item in items:
            for attempt in range(20):
                try:
                    self.registry.store_batch([item])
                    break
                except Exception as exc:  # noqa: BLE001
                    if not _transient(exc):
                        self.refused_messages += 1
                        log.error("a message from %s is refused by the database and dropped: %s", item[0],
                                  str(exc).splitlines()[0][:300])
                        break
                    time.sleep(min(0.5 * 2 ** attempt, 10.0))

    # -- chunk requests (worker pool) --------------------------------------------------------------

    def authorised(self, device: str, sha256: str) -> bool:
        """Whether ``device`` may fetch ``sha256``: a retained desired state for it, or for a group it
        follows or is in, names that bundle."""
        if sha256 in self.wanted.get(topics.desired(device), ()):
            return True
        return any(sha256 in self.wanted.get(topics.group_desired(g), ()) for g in self._groups.get(device, ()))

    def _serve_chunks_job(self, device: str, payload: bytes) -> None:
        try:
            self._serve_chunks(device, payload)
        except Exception:  # noqa: BLE001 - one request must not cost the pool
            log.exception("chunk request from %s failed", device)
        finally:
            self._chunk_queue.release()

    def _serve_chunks(self, device: str, payload: bytes) -> None:
        try:
            sha256, indexes = chunks.parse_request(payload)
        except chunks.ChunkError as exc:
            log.warning("bad chunk request from %s: %s", device, exc)
            return
        if not self.authorised(device, sha256):
            self.chunks_refused += 1
            log.warning("device %s asks for bundle %s, which no desired state for it names", device, sha256[:12])
            return
        path = self.shelf.find(sha256)
        if path is None:
            log.warning("device %s asks for unknown bundle %s", device, sha256)
            return
        granted = self._buckets.setdefault(device, TokenBucket(self.chunk_burst)).take(
            len(indexes), self.chunk_rate, self.chunk_burst)
        if granted < len(indexes):
            self.chunks_dropped += len(indexes) - granted  # asked again after the device's chunk time-out
        size = path.stat().st_size
        now = time.monotonic()
        with self._recent_lock:
            if len(self._recent) > 200_000:
                self._recent = {k: t for k, t in self._recent.items() if now - t < self.RESEND_AFTER_S}
            fresh = []
            for index in indexes[:granted]:
                if now - self._recent.get((device, sha256, index), -1e9) < self.RESEND_AFTER_S:
                    self.chunks_repeated += 1
                    continue
                self._recent[(device, sha256, index)] = now
                fresh.append(index)
        with open(path, "rb") as handle:
            for index in fresh:
                if index * chunks.CHUNK_BYTES >= size:
                    continue
                frame = self._frame(handle, sha256, index)
                # No lock of ours around publish: paho calls back (on_publish, on_message) holding its
                # own locks, and a lock taken on both sides deadlocks the network thread.
                info = self.client.publish(topics.chunk_data(device), frame, qos=1)
                if info.rc != 0:
                    self.chunks_dropped += 1  # paho's queue is full (or the link is down): asked again later
                    with self._recent_lock:
                        self._recent.pop((device, sha256, index), None)
                    continue
                self.chunks_sent += 1
                self.bytes_sent += len(frame)
                self.sent_to[(device, sha256)] = self.sent_to.get((device, sha256), 0) + 1

    def _frame(self, handle, sha256: str, index: int) -> bytes:
        """The frame of one chunk, from a cache: a rollout sends the same chunks to every device (read,
        hashed and framed once, not once per device), at most FRAME_CACHE_BYTES of them."""
        key = (sha256, index)
        frame = self._frames.get(key)
        if frame is None:
            handle.seek(index * chunks.CHUNK_BYTES)
            frame = chunks.encode_frame(sha256, index, handle.read(chunks.CHUNK_BYTES))
            with self._recent_lock:
                if key in self._frames:  # another worker framed it meanwhile
                    return self._frames[key]
                self._frames[key] = frame
                self._frame_bytes += len(frame)
                while self._frame_bytes > self.FRAME_CACHE_BYTES and self._frames:
                    self._frame_bytes -= len(self._frames.pop(next(iter(self._frames))))  # oldest first
        return frame

    # -- rollouts (tick thread) --------------------------------------------------------------------

    def publish_desired(self, topic: str, payload: bytes, timeout: float = 10.0) -> bool:
        """Publish a signed desired state, retained; True once the broker has it."""
        self._note_desired(topic, payload)
        deadline = time.monotonic() + timeout
        while True:
            info = self.client.publish(topic, payload, qos=1, retain=True)
            if info.rc == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # paho's queue is full of chunk frames: a desired state waits, it is not dropped
        try:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def _tick(self, until: threading.Event) -> None:
        from . import rollouts

        last_purge = 0.0
        while not until.wait(self.tick_s):
            try:
                # Rollouts need the signing key; retention runs on every controller (one without
                # --key still stores telemetry, and must not keep it for ever).
                if self.connected.is_set() and self.signing_key is not None:
                    rollouts.tick(self)
                if time.time() - last_purge > 3600:
                    last_purge = time.time()
                    self.registry.purge(self.keep_raw_s, self.keep_rollups_s)
            except Exception:  # noqa: BLE001 - the next tick tries again
                log.exception("rollout tick failed")

    # -- running -----------------------------------------------------------------------------------

    def serve(self, until: threading.Event | None = None) -> None:
        """Run until ``until`` is set (or forever); then store and acknowledge what was received."""
        # A persistent session: while the controller is away the broker queues the devices' QoS 1
        # messages for it (a device deletes a spooled message once the broker has it).
        self.client.reconnect_delay_set(0.2, 5)
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30,
                                  **self.broker.connect_kwargs(persistent=True, receive_maximum=1000))
        self.client.loop_start()
        stop = until or self._stop
        writer_done = threading.Event()
        writer = threading.Thread(target=self._write, args=(writer_done,), name="fleet-writer", daemon=True)
        ticker = threading.Thread(target=self._tick, args=(stop,), name="fleet-tick", daemon=True)
        writer.start()
        if self.role != "ingest":
            ticker.start()
        try:
            stop.wait()
        finally:
            # Drain: nothing new is taken (unacknowledged, it stays with the broker), what was taken is
            # stored and acknowledged, then the connection closes.
            self._closing.set()
            writer_done.set()
            writer.join(30)
            if ticker.is_alive():
                ticker.join(10)
            self._chunk_pool.shutdown(wait=True, cancel_futures=True)
            self.retired = (self.retire and not writer.is_alive() and self.taken == 0 and not self.late
                            and self.inbox.empty())
            if self.retired:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                ending = Properties(PacketTypes.DISCONNECT)
                ending.SessionExpiryInterval = 0  # the broker forgets the session (and its share) now
                self.client.disconnect(properties=ending)
            else:
                self.client.disconnect()
            self.client.loop_stop()

    def stop(self) -> None:
        self._stop.set()


def publish_retained(broker: Broker, topic: str, payload: bytes, client_id: str, timeout: float = 10.0) -> None:
    """Connect, publish one retained QoS 1 message, wait for its PUBACK, disconnect."""
    client = broker.client(client_id)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p=None: connected.set() if not rc.is_failure else None
    try:
        client.connect(broker.host, broker.port, keepalive=30, **broker.connect_kwargs())
    except OSError as exc:
        raise UsageError(f"cannot reach the broker at {broker.host}:{broker.port} ({exc.strerror or exc}); "
                         "check --broker") from None
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise UsageError(f"the broker at {broker.host}:{broker.port} did not accept the connection; "
                             "check --broker and the credentials")
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise UsageError(f"the broker did not acknowledge the desired state on {topic}")
    finally:
        client.disconnect()
        client.loop_stop()


def read_retained_version(broker: Broker, topic: str, client_id: str, timeout: float = 5.0) -> int:
    """The version of the desired state retained on ``topic`` (0 when there is none): the next push
    uses one more, so no pusher's clock decides the counter every device compares against."""
    client = broker.client(client_id)
    subscribed, got = threading.Event(), threading.Event()
    found: list[int] = []

    def on_message(c, u, message):
        try:
            document = json.loads(json.loads(message.payload)["desired"])
            found.append(int(document["version"]))
        except (ValueError, KeyError, TypeError):
            pass  # not ours, or cleared: no version to go on from
        got.set()

    client.on_message = on_message
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=1) if not rc.is_failure else None
    client.on_subscribe = lambda *args: subscribed.set()
    try:
        client.connect(broker.host, broker.port, keepalive=30, **broker.connect_kwargs())
    except OSError as exc:
        raise UsageError(f"cannot reach the broker at {broker.host}:{broker.port} ({exc.strerror or exc}); "
                         "check --broker") from None
    client.loop_start()
    try:
        if not subscribed.wait(timeout):
            raise UsageError(f"the broker at {broker.host}:{broker.port} did not accept the connection; "
                             "check --broker and the credentials")
        got.wait(0.5)  # a retained message comes right after the SUBACK
    finally:
        client.disconnect()
        client.loop_stop()
    return max(found, default=0)


def bundle_refs(bundles: list[Path], bundle_url: str | None = None) -> tuple[tuple[str, str], dict]:
    """(model name, version) and profile -> BundleRef of ``bundles`` (one per profile, one model version)."""
    from edgepack.bundle import open_bundle

    from .desired import BundleRef, chunk_digests_of

    refs, model = {}, None
    for path in bundles:
        with open_bundle(path, verify_files=True) as bundle:
            manifest = bundle.manifest
        this = (manifest["name"], manifest["version"])
        if model and this != model:
            raise UsageError(f"{path} is {this[0]} {this[1]}, the other bundles are {model[0]} {model[1]}; "
                             "push one model version at a time")
        model = this
        if manifest["profile"] in refs:
            raise UsageError(f"two bundles for profile {manifest['profile']!r}; give one per profile")
        digest = sha256_file(path)
        refs[manifest["profile"]] = BundleRef(sha256=digest, size=Path(path).stat().st_size,
                                              chunk_bytes=chunks.CHUNK_BYTES,
                                              chunks=chunk_digests_of(path, chunks.CHUNK_BYTES), file=Path(path).name,
                                              url=f"{bundle_url}{digest}.edgepack" if bundle_url else None)
    return model, refs


def desired_for_bundles(bundles: list[Path], *, device: str | None, group: str | None, version: int,
                        expires_s: float, probation: dict | None = None, bundle_url: str | None = None,
                        shadow: list[Path] | None = None, shadow_sample_rate: float | None = None):
    """The desired state naming ``bundles`` (one per profile, same model and version), with the
    signed chunk list of each and the probation budget devices enforce (``probation``); with
    ``bundle_url``, each bundle's HTTP(S) source ``<bundle_url><sha256>.edgepack``; with ``shadow``,
    another version of the model to run in shadow beside it."""
    from .desired import DesiredState, ModelRef, ProbationBudget, ShadowRef

    model, refs = bundle_refs(bundles, bundle_url)
    shadow_ref = None
    if shadow:
        candidate, shadow_refs = bundle_refs(shadow, bundle_url)
        if candidate[0] != model[0] or candidate[1] == model[1]:
            raise UsageError(f"--shadow: give another version of {model[0]} (the shadow is {candidate[0]} {candidate[1]})")
        missing = sorted(set(refs) - set(shadow_refs))
        if missing:
            raise UsageError(f"--shadow: no shadow bundle for profile {', '.join(missing)}; give one per profile pushed")
        shadow_ref = ShadowRef(version=candidate[1], bundles=shadow_refs, sample_rate=shadow_sample_rate)
    now = time.time()
    state = DesiredState(version=version, device=device, group=group, issued_at=now, expires_at=now + expires_s,
                         model=ModelRef(name=model[0], version=model[1]), bundles=refs,
                         probation=ProbationBudget(**probation) if probation else None, shadow=shadow_ref)
    size = len(json.dumps(state.document())) + 512  # the envelope and its signatures
    from .desired import MAX_DESIRED_BYTES

    if size > MAX_DESIRED_BYTES:
        raise UsageError(f"the bundles are too large for one signed desired state over MQTT ({size} bytes of chunk "
                         f"list, devices take {MAX_DESIRED_BYTES}); push fewer profiles at a time")
    return state

