"""The MQTT connection behind one narrow interface, on paho-mqtt 2.x.

paho's callbacks run on its network thread; here they only hand an event to ``deliver`` (which the
daemon wires to ``loop.call_soon_threadsafe``), so no agent logic ever runs on that thread. Events:

- ``("connected", session_present)`` / ``("disconnected", reason)``
- ``("message", topic, payload, retained)``
- ``("puback", mid, failure)``: the broker answered the QoS 1 message ``mid``; ``failure`` is None when
  it took it, else the MQTT 5 reason (quota exceeded, not authorized…)

Connection policy: MQTT 5 first and 3.1.1 when the broker refuses the protocol version; a persistent
session (QoS 1 subscriptions and in-flight messages survive a reconnect); a Last Will on the retained
state topic; reconnection with capped exponential backoff and jitter (paho's own backoff has no
jitter, and a fleet reconnecting after a broker restart would arrive in lockstep).
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
from typing import Callable

log = logging.getLogger("edgepack.agent.mqtt")

Deliver = Callable[[tuple], None]


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
            client.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                           certfile=str(cfg.cert_file) if cfg.cert_file else None,
                           keyfile=str(cfg.key_file) if cfg.key_file else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.will:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)
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
            client.connect(cfg.host, cfg.port, keepalive=int(cfg.keepalive_s), clean_start=False, properties=properties)
        else:
            client.connect(cfg.host, cfg.port, keepalive=int(cfg.keepalive_s))

    def _run(self) -> None:
        delay = self.config.reconnect_min_s
        while not self._stop.is_set():
            if self._client is None:
                self._client = self._make_client()
            self._connected_once = False
            try:
                self._connect(self._client)
                self._client.loop_forever(retry_first_connection=False)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.debug("mqtt connect failed", extra={"error": str(exc)})
            self.connected = False
            if self._stop.is_set():
                break
            if self._connected_once:
                delay = self.config.reconnect_min_s
            # Full backoff with jitter: somewhere in [delay/2, delay], then double up to the cap.
            self._stop.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.config.reconnect_max_s)

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            if self.protocol == "5" and self.config.protocol == "auto" and reason_code.value in (1, 132):
                # The broker speaks MQTT 3.1.1 only: fall back for this and every later connection.
                self.protocol = "3.1.1"
                self._client = None
            log.warning("mqtt connection refused", extra={"reason": str(reason_code)})
            client.disconnect()
            return
        self.connected = True
        self._connected_once = True
        for topic, qos in self.subscriptions.items():
            client.subscribe(topic, qos)
        self.deliver(("connected", bool(getattr(flags, "session_present", False))))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        was = self.connected
        self.connected = False
        if was:
            self.deliver(("disconnected", str(reason_code)))

    def _on_message(self, client, userdata, message) -> None:
        self.deliver(("message", message.topic, bytes(message.payload), bool(message.retain)))

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        failed = bool(reason_code is not None and getattr(reason_code, "is_failure", False))
        self.deliver(("puback", mid, str(reason_code) if failed else None))
