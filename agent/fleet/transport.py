"""The MQTT connection behind one narrow interface, on paho-mqtt 2.x.

paho's callbacks run on its network thread; here they only hand an event to ``deliver`` (which the
daemon wires to ``loop.call_soon_threadsafe``), so no agent logic ever runs on that thread. Events:

- ``("connected", session_present)`` / ``("disconnected", reason)``
- ``("message", topic, payload, retained, qos)``
- ``("puback", mid, failure)``: the broker answered the QoS 1 message ``mid``; ``failure`` is None when
  it took it, else the MQTT 5 reason (quota exceeded, not authorized…)
- ``("link", state)``: a connection attempt failed (``state`` is :attr:`Transport.state`)

Connection policy: with ``protocol: auto``, MQTT 5 first and 3.1.1 when the broker refuses the protocol
version **or closes the socket without a CONNACK** (what clustered brokers did before their MQTT 5
releases); the protocol that worked is kept. A persistent session (QoS 1 subscriptions and in-flight
messages survive a reconnect); a Last Will on the retained state topic; reconnection with capped
exponential backoff and jitter (paho's own backoff has no jitter, and a fleet reconnecting after a
broker restart would arrive in lockstep). Every failed attempt is logged with its reason, at most
once per :data:`LOG_EVERY_S` for the same reason.

Limits before parsing: MQTT 5 Maximum Packet Size and Receive Maximum tell the broker what this agent
takes; with 3.1.1 a larger message is dropped on paho's thread, unread. At most :data:`MAX_QUEUED`
messages wait for the event loop; then paho's thread waits (the socket is not read, TCP pushes back).
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from typing import Callable

from edgepack.fleet.nodelay import no_delay

log = logging.getLogger("edgepack.agent.mqtt")

Deliver = Callable[[tuple], None]
#: messages handed to the event loop and not yet handled
MAX_QUEUED = 256
#: the same connection failure is logged at most this often
LOG_EVERY_S = 30.0
#: MQTT 5 CONNACK reasons that mean "not this protocol version"
UNSUPPORTED_PROTOCOL = (1, 132)


class _Failed(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class Transport:
    """One MQTT client connection that reconnects by itself until :meth:`stop`."""

    def __init__(self, config, client_id: str, deliver: Deliver, will: tuple[str, bytes] | None = None):
        self.config = config
        self.client_id = client_id
        self.deliver = deliver
        self.will = will
        self.protocol = "5" if config.protocol in ("auto", "5") else "3.1.1"
        self.subscriptions: dict[str, int] = {}
        self.connected = False
        #: the protocol that worked once (auto stops switching then)
        self._settled = config.protocol != "auto"
        self.state = {"connected": False, "protocol": self.protocol, "attempts": 0, "failures": 0,
                      "last_error": None, "since": time.time()}
        self._logged: dict[str, float] = {}
        self._room = threading.BoundedSemaphore(MAX_QUEUED)
        self.dropped = 0
        self._connected_once = False
        self._refused: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None
        self._lock = threading.Lock()

    # -- the interface -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now (when connected) and after every reconnect."""
        self.subscriptions[topic] = qos
        client = self._client
        if client is not None and self.connected:
            client.subscribe(topic, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Hand a message to paho; its mid (a ``puback`` event follows for QoS 1), or None when not
        connected (the caller keeps it and tries again after the next ``connected``)."""
        client = self._client
        if client is None or not self.connected:
            return None
        info = client.publish(topic, payload, qos=qos, retain=retain)
        return info.mid if info.rc == 0 else None

    def delivered(self) -> None:
        """The event loop handled one ``message`` event: room for the next."""
        try:
            self._room.release()
        except ValueError:
            pass

    def stop(self, last: tuple[str, bytes] | None = None, timeout: float = 2.0) -> None:
        """Publish ``last`` (the retained offline state) if connected, disconnect, stop the thread."""
        self._stop.set()
        client = self._client
        if client is not None:
            if last and self.connected:
                try:
                    client.publish(*last, qos=1, retain=True).wait_for_publish(timeout)
                except (RuntimeError, ValueError):
                    pass
            client.disconnect()
        if self._thread:
            self._thread.join(timeout + 3)

    # -- paho --------------------------------------------------------------------------------------

    def _make_client(self):
        import paho.mqtt.client as mqtt

        protocol = mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311
        kwargs = {} if self.protocol == "5" else {"clean_session": False}
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol,
                             reconnect_on_failure=False, **kwargs)
        cfg = self.config
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.secret())
        if cfg.tls or cfg.ca_file or cfg.cert_file:
            try:
                client.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                               certfile=str(cfg.cert_file) if cfg.cert_file else None,
                               keyfile=str(cfg.key_file) if cfg.key_file else None,
                               cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise _Failed("tls", f"cannot use the TLS files: {exc}") from None
        if self.will:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)
        client.on_socket_open = no_delay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _connect(self, client) -> None:
        cfg = self.config
        if self.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = int(cfg.session_expiry_s)
            properties.MaximumPacketSize = int(cfg.max_packet_bytes)
            properties.ReceiveMaximum = int(cfg.receive_maximum)
            client.connect(cfg.host, cfg.port, keepalive=int(cfg.keepalive_s), clean_start=False, properties=properties)
        else:
            client.connect(cfg.host, cfg.port, keepalive=int(cfg.keepalive_s))

    def _run(self) -> None:
        delay = self.config.reconnect_min_s
        while not self._stop.is_set():
            self._connected_once = False
            self._refused = None
            self._attempt_protocol = self.protocol
            tcp = False
            try:
                if self._client is None:
                    self._client = self._make_client()
                self.state["attempts"] += 1
                self._connect(self._client)
                tcp = True
                self._client.loop_forever(retry_first_connection=False)
            except _Failed as exc:
                self._failed(exc.reason, exc.message)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._failed("tls" if isinstance(exc, ssl.SSLError) else "connect",
                             f"cannot connect to {self.config.host}:{self.config.port}: {exc}")
            except Exception as exc:  # noqa: BLE001 - the link thread must never die
                self._failed("error", f"{type(exc).__name__}: {exc}")
            else:
                if tcp and not self._connected_once and not self._stop.is_set():
                    if self._refused:
                        switched = f"; trying MQTT {self.protocol}" if self.protocol != self._attempt_protocol else ""
                        self._failed("refused", f"the broker refused the MQTT {self._attempt_protocol} connection: "
                                     f"{self._refused}{switched}")
                    else:
                        self._no_connack()
            self.connected = False
            self.state["connected"] = False
            if self._stop.is_set():
                break
            if self._connected_once:
                delay = self.config.reconnect_min_s
            # Full backoff with jitter: somewhere in [delay/2, delay], then double up to the cap.
            self._stop.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.config.reconnect_max_s)

    def _no_connack(self) -> None:
        """The broker took the TCP connection and closed it without a CONNACK."""
        if not self._settled and self.protocol == "5":
            # Brokers without MQTT 5 (clustered ones before their MQTT 5 releases) drop the socket on
            # an MQTT 5 CONNECT instead of answering it: try 3.1.1 next.
            self._failed("no-connack", "the broker closed the connection without answering the MQTT 5 CONNECT; "
                         "trying MQTT 3.1.1")
            self._switch("3.1.1")
        elif not self._settled:
            self._failed("no-connack", "the broker closed the connection without answering the MQTT 3.1.1 CONNECT "
                         "either; trying MQTT 5 again")
            self._switch("5")
        else:
            self._failed("no-connack", f"the broker closed the connection without answering the MQTT {self.protocol} "
                         "CONNECT (check mqtt.protocol and the broker's settings)")

    def _switch(self, protocol: str) -> None:
        self.protocol = protocol
        self.state["protocol"] = protocol
        self._client = None

    def _failed(self, reason: str, message: str) -> None:
        self.state.update(failures=self.state["failures"] + 1, last_error=message, connected=False, since=time.time())
        now = time.monotonic()
        if now - self._logged.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[reason] = now
            log.warning("mqtt connection failed", extra={"reason": reason, "error": message,
                                                         "protocol": getattr(self, "_attempt_protocol", self.protocol),
                                                         "next_protocol": self.protocol, "attempts": self.state["attempts"]})
        try:
            self.deliver(("link", dict(self.state), reason))
        except Exception:  # noqa: BLE001 - the loop may be gone at shutdown
            pass

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            if self.protocol == "5" and not self._settled and reason_code.value in UNSUPPORTED_PROTOCOL:
                # The broker speaks MQTT 3.1.1 only: fall back for this and every later connection.
                self._switch("3.1.1")
            self._refused = str(reason_code)
            client.disconnect()
            return
        self.connected = True
        self._connected_once = True
        self._settled = True
        self.state.update(connected=True, protocol=self.protocol, last_error=None, since=time.time())
        for topic, qos in self.subscriptions.items():
            client.subscribe(topic, qos)
        self.deliver(("connected", bool(getattr(flags, "session_present", False))))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        was = self.connected
        self.connected = False
        if was:
            self.deliver(("disconnected", str(reason_code)))

    def _on_message(self, client, userdata, message) -> None:
        if len(message.payload) > self.config.max_packet_bytes:
            # MQTT 3.1.1 has no Maximum Packet Size: drop it here, before it is copied or parsed.
            self.dropped += 1
            self.deliver(("dropped", message.topic, "oversized"))
            return
        # Back-pressure: wait for the event loop to catch up (the socket is not read meanwhile).
        if not self._room.acquire(timeout=30):
            self.dropped += 1
            self.deliver(("dropped", message.topic, "backlog"))
            return
        self.deliver(("message", message.topic, bytes(message.payload), bool(message.retain), int(message.qos)))

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        failed = bool(reason_code is not None and getattr(reason_code, "is_failure", False))
        self.deliver(("puback", mid, str(reason_code) if failed else None))
