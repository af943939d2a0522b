"""The minimal fleet controller: ``edgepack fleet serve`` (records device state, telemetry and events;
answers bundle chunk requests) and ``edgepack fleet push`` (signs and publishes a desired state).

paho's callbacks only enqueue; one thread handles the messages in order.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from edgepack.bundle.format import sha256_file
from edgepack.errors import UsageError

from . import chunks, topics
from .registry import FleetRegistry

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

    def client(self, client_id: str, clean: bool = True):
        """A paho client for the negotiated protocol (3.1.1: ``clean`` is its clean-session flag)."""
        import paho.mqtt.client as mqtt

        if self.negotiate() == "5":
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                 clean_session=clean)
        self._auth(client)
        return client

    def connect_kwargs(self, persistent: bool = False) -> dict:
        """Keyword arguments of ``connect``/``connect_async`` for the negotiated protocol."""
        if self.negotiate() != "5":
            return {}
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if not persistent:
            return {"clean_start": True}
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 7 * 24 * 3600
        return {"clean_start": False, "properties": properties}


class BundleShelf:
    """The bundles the controller can send, found by sha256 in one folder (rescanned on a miss)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._index: dict[str, Path] = {}
        self._seen: dict[Path, tuple] = {}

    def _scan(self) -> None:
        for path in self.folder.glob("*.edgepack"):
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            if self._seen.get(path) == key:
                continue
            self._seen[path] = key
            self._index[sha256_file(path)] = path

    def find(self, sha256: str) -> Path | None:
        if sha256 not in self._index:
            self._scan()
        return self._index.get(sha256)

    def add(self, bundle: Path) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / Path(bundle).name
        if Path(bundle).resolve() != target.resolve():
            shutil.copyfile(bundle, target)
        return target


class FleetController:
    """Subscribes to every device's topics; records what they say and serves bundle chunks."""

    def __init__(self, broker: Broker, db_url: str | None, bundles: Path, client_id: str = "edgepack-fleet"):
        self.broker = broker
        self.registry = FleetRegistry(db_url)
        self.shelf = BundleShelf(bundles)
        self.client = broker.client(client_id, clean=False)
        self.inbox: queue.Queue = queue.Queue()
        self.chunks_sent = 0
        self.bytes_sent = 0
        #: False: chunk requests are read and not answered (a controller that cannot serve, in tests)
        self.serve_chunks = True
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload)))

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.error("broker refused the controller: %s", reason_code)
            return
        for leaf in ("state", "telemetry", "events", "chunks/req"):
            client.subscribe(f"{topics.PREFIX}/devices/+/{leaf}", qos=1)
        self.connected.set()

    def handle(self, topic: str, payload: bytes) -> None:
        parsed = topics.parse_device_topic(topic)
        if not parsed:
            return
        device, leaf = parsed
        if leaf == "chunks/req":
            if self.serve_chunks:
                self._serve_chunks(device, payload)
            return
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("not JSON from %s on %s", device, leaf)
            return
        if not isinstance(message, dict):
            return
        if leaf == "state":
            self.registry.record_state(device, message)
        elif leaf in ("telemetry", "events"):
            self.registry.record_message(device, message)

    def _serve_chunks(self, device: str, payload: bytes) -> None:
        try:
            sha256, indexes = chunks.parse_request(payload)
        except chunks.ChunkError as exc:
            log.warning("bad chunk request from %s: %s", device, exc)
            return
        path = self.shelf.find(sha256)
        if path is None:
            log.warning("device %s asks for unknown bundle %s", device, sha256)
            return
        size = path.stat().st_size
        with open(path, "rb") as handle:
            for index in indexes:
                if index * chunks.CHUNK_BYTES >= size:
                    continue
                handle.seek(index * chunks.CHUNK_BYTES)
                frame = chunks.encode_frame(sha256, index, handle.read(chunks.CHUNK_BYTES))
                self.client.publish(topics.chunk_data(device), frame, qos=1)
                self.chunks_sent += 1
                self.bytes_sent += len(frame)

    def serve(self, until: threading.Event | None = None) -> None:
        """Run until ``until`` is set (or forever)."""
        # A persistent session: while the controller is away the broker queues the devices' QoS 1
        # messages for it (a device deletes a spooled message once the broker has it).
        self.client.reconnect_delay_set(0.2, 5)
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30,
                                  **self.broker.connect_kwargs(persistent=True))
        self.client.loop_start()
        stop = until or self._stop
        try:
            while not stop.is_set():
                try:
                    topic, payload = self.inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    self.handle(topic, payload)
                except Exception:  # noqa: BLE001 - one bad message must not stop the controller
                    log.exception("handling %s failed", topic)
        finally:
            self.client.disconnect()
            self.client.loop_stop()


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


def desired_for_bundles(bundles: list[Path], *, device: str | None, group: str | None, version: int,
                        expires_s: float, probation: dict | None = None):
    """The desired state naming ``bundles`` (one per profile, same model and version), with the
    signed chunk list of each and the probation budget devices enforce (``probation``)."""
    from edgepack.bundle import open_bundle

    from .desired import BundleRef, DesiredState, ModelRef, ProbationBudget, chunk_digests_of

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
        refs[manifest["profile"]] = BundleRef(sha256=sha256_file(path), size=Path(path).stat().st_size,
                                              chunk_bytes=chunks.CHUNK_BYTES,
                                              chunks=chunk_digests_of(path, chunks.CHUNK_BYTES), file=Path(path).name)
    now = time.time()
    state = DesiredState(version=version, device=device, group=group, issued_at=now, expires_at=now + expires_s,
                         model=ModelRef(name=model[0], version=model[1]), bundles=refs,
                         probation=ProbationBudget(**probation) if probation else None)
    size = len(json.dumps(state.document())) + 512  # the envelope and its signatures
    from .desired import MAX_DESIRED_BYTES

    if size > MAX_DESIRED_BYTES:
        raise UsageError(f"the bundles are too large for one signed desired state over MQTT ({size} bytes of chunk "
                         f"list, devices take {MAX_DESIRED_BYTES}); push fewer profiles at a time")
    return state

