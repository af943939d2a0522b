"""The MQTT streams' own connection: MQTT 3.1.1 read and written on the event loop.

The fleet link's connection (paho-mqtt, :mod:`agent.fleet.transport`) parses every packet in Python on
its own thread and hands each message to the loop: measured on a 2-core host (the agent is bound by the
GIL at about one core), that thread cost 100-160 µs per streamed answer, and an echo built that way
197 µs per QoS 1 message against 91 µs for gmqtt (asyncio, a reader task and a queue per packet). On
this connection the agent's whole CPU per streamed answer fell from 530 to 210-250 µs (README,
"Streaming inference"). So streams get a
connection of their own, next to the link's, with the same ``mqtt`` settings (host, port, TLS files,
username and password) and the client id ``{device}-stream``:

- **MQTT 3.1.1**, which every broker speaks (MQTT 5 brokers too). A clean session: a stream is live
  traffic, so requests published while the agent is offline are not kept for it (the client's own
  timeout sends them again); the link's persistent session keeps the fleet's messages.
- Subscribes at QoS 1 to each streaming model's input topic; a request comes at its publisher's QoS
  (0 or 1; the broker delivers at the lower of the two) and is acknowledged when it has been read.
  Answers go at the request's QoS. Writes made in one loop iteration (the answers of one batch, the
  acknowledgements of one read) leave in one ``send``.
- A packet longer than ``mqtt.max_packet_bytes`` is skipped as it arrives, never buffered; a malformed
  one closes the connection. A PINGREQ every half keepalive; a broker silent for 1.5 keepalives is a dead
  link (closed and reconnected). Reconnection with capped exponential backoff and jitter, as the link's.
- Back-pressure: while the socket's send buffer is over its high-water mark (a slow broker), the socket
  is not read, so no more requests are taken than answers can leave.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import struct
import time
from typing import Callable

log = logging.getLogger("edgepack.agent.stream")

#: handler(topic, payload, qos) for a message on a subscribed topic
Handler = Callable[[str, bytes, int], None]
#: the same connection failure is logged at most this often
LOG_EVERY_S = 30.0
#: seconds to wait for the CONNACK
CONNECT_TIMEOUT_S = 10.0
#: MQTT 3.1.1 CONNACK return codes
REFUSED = {1: "unacceptable protocol version", 2: "client identifier rejected", 3: "server unavailable",
           4: "bad user name or password", 5: "not authorized"}


class ProtocolError(Exception):
    """The broker sent something that is not MQTT 3.1.1."""


def _string(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, keepalive_s: int, username: str | None, password: str | None) -> bytes:
    """A clean-session MQTT 3.1.1 CONNECT."""
    flags = 0x02 | (0x80 if username else 0) | (0x40 if username and password is not None else 0)
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive_s) + _string(client_id)
    if username:
        body += _string(username)
        if password is not None:
            body += _string(password)
    return b"\x10" + remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, topics: list[str], qos: int = 1) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_string(topic) + bytes([qos]) for topic in topics)
    return b"\x82" + remaining_length(len(body)) + body


class _Protocol(asyncio.Protocol):
    """One TCP (or TLS) connection to the broker: parses what arrives, batches what leaves."""

    def __init__(self, owner: "StreamConnection", loop: asyncio.AbstractEventLoop):
        self.owner = owner
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()
        self._buffer = bytearray()
        self._skip = 0  # bytes of an oversized packet still to discard
        self._out: list[bytes] = []
        self._next_id = 0
        self.heard = time.monotonic()

    # -- asyncio -----------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small answers leave at once rather than after the peer's delayed ACK (40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        owner = self.owner
        self.write(connect_packet(owner.client_id, int(owner.config.keepalive_s), owner.config.username, owner.password))

    def connection_lost(self, exc) -> None:
        self.transport = None
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"the broker closed the connection{f': {exc}' if exc else ''}"))
            # Marked as read: a connection given up before anything awaited its CONNACK (a connect that
            # timed out after the socket was made) must not log "Future exception was never retrieved";
            # an attempt that awaits it still gets the exception.
            self.connack.exception()
        if not self.closed.done():
            self.closed.set_result(str(exc) if exc else "closed")

    def pause_writing(self) -> None:
        # Answers cannot leave as fast as requests come: stop taking requests until they can.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.heard = time.monotonic()
        try:
            self._parse(data)
        except ProtocolError as exc:
            log.warning("the broker sent a malformed packet; reconnecting", extra={"error": str(exc)})
            self.abort()

    # -- reading -----------------------------------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data, self._skip = data[self._skip:], 0
        if self._buffer:
            self._buffer += data
            view = self._buffer
        else:
            view = data
        limit = self.owner.config.max_packet_bytes
        pos, end = 0, len(view)
        while end - pos >= 2:
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= end:
                    break
                byte = view[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise ProtocolError("a remaining length longer than 4 bytes")
            if view[i - 1] & 0x80:
                break  # the length itself is not complete yet
            if length > limit:
                # Dropped unread: never buffer what the limit says this agent does not take.
                self.owner.dropped += 1
                if self.owner.metrics is not None:
                    self.owner.metrics.dropped_messages.labels("stream_too_large").inc()
                log.warning("a streamed message over mqtt.max_packet_bytes was dropped",
                            extra={"bytes": length, "limit": limit})
                if end - i >= length:
                    pos = i + length
                    continue
                self._skip, pos = length - (end - i), end
                break
            if end - i < length:
                break
            self._packet(view[pos], view, i, i + length)
            pos = i + length
        if pos >= end:
            self._buffer = bytearray()
        elif view is self._buffer:
            del self._buffer[:pos]
        else:
            self._buffer = bytearray(view[pos:])

    def _packet(self, first: int, view, start: int, stop: int) -> None:
        kind = first >> 4
        if kind == 3:  # PUBLISH
            qos = (first >> 1) & 3
            if stop - start < 2:
                raise ProtocolError("a PUBLISH without a topic")
            topic_end = start + 2 + ((view[start] << 8) | view[start + 1])
            topic = bytes(view[start + 2:topic_end])
            if qos == 1:
                self.write(b"\x40\x02" + bytes(view[topic_end:topic_end + 2]))
                topic_end += 2
            elif qos:
                raise ProtocolError("a QoS 2 PUBLISH on a QoS 1 subscription")
            if topic_end > stop:
                raise ProtocolError("a PUBLISH shorter than its topic")
            handler = self.owner.handlers.get(topic)
            if handler is not None:
                handler(topic.decode(), bytes(view[topic_end:stop]), qos)
        elif kind == 4:  # PUBACK of an answer
            self.owner.unacked = max(0, self.owner.unacked - 1)
        elif kind == 2:  # CONNACK
            if stop - start != 2:
                raise ProtocolError("a CONNACK of the wrong length")
            code = view[start + 1]
            if not self.connack.done():
                if code == 0:
                    self.connack.set_result(True)
                else:
                    self.connack.set_exception(ConnectionRefusedError(
                        f"the broker refused the MQTT 3.1.1 connection: {REFUSED.get(code, f'code {code}')}"))
        elif kind == 9:  # SUBACK
            if 0x80 in bytes(view[start + 2:stop]):
                self.owner.state["subscribe_refused"] = self.owner.state.get("subscribe_refused", 0) + 1
                if self.owner.metrics is not None:
                    self.owner.metrics.stream_failures.labels("subscribe_refused").inc()
                log.warning("the broker refused a stream subscription (check its ACL for the {device}-stream client)",
                            extra={"client_id": self.owner.client_id})
        elif kind != 13:  # PINGRESP needs nothing; anything else is not for a client
            raise ProtocolError(f"packet type {kind}")

    # -- writing -----------------------------------------------------------------------------------

    def write(self, packet: bytes) -> None:
        """Queue a packet; everything queued in one loop iteration is written together."""
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(packet)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class StreamConnection:
    """An MQTT 3.1.1 connection that subscribes ``handlers``' topics and reconnects until :meth:`close`."""

    def __init__(self, config, client_id: str, handlers: dict[str, Handler], metrics=None):
        """``metrics``: the daemon's :class:`~agent.serving.metrics.ServingMetrics` (connected gauge, failures
        by reason, oversized messages dropped), or None."""
        self.config = config
        self.metrics = metrics
        self.client_id = client_id
        self.handlers = {topic.encode(): handler for topic, handler in handlers.items()}
        self.password: str | None = None
        self.connected = False
        self.dropped = 0  # oversized messages skipped
        self.unacked = 0  # QoS 1 answers the broker has not acknowledged
        self.state = {"connected": False, "attempts": 0, "failures": 0, "last_error": None}
        self._protocol: _Protocol | None = None
        self._task: asyncio.Task | None = None
        self._topics: dict[str, bytes] = {}
        self._logged: dict[str, float] = {}

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> bool:
        """Send ``payload`` on ``topic`` at QoS 0 or 1; False when not connected (the answer is lost
        with the connection, as a request in flight is)."""
        protocol = self._protocol
        if protocol is None or not self.connected:
            return False
        name = self._topics.get(topic)
        if name is None:
            name = self._topics[topic] = _string(topic)
        if qos:
            self.unacked += 1
            head = name + struct.pack("!H", protocol.packet_id())
            protocol.write(b"\x32" + remaining_length(len(head) + len(payload)) + head + payload)
        else:
            protocol.write(b"\x30" + remaining_length(len(name) + len(payload)) + name + payload)
        return True

    async def close(self) -> None:
        """Disconnect (a DISCONNECT, so the broker drops the session quietly) and stop reconnecting."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        delay = self.config.reconnect_min_s
        loop = asyncio.get_running_loop()
        while True:
            connected = False
            try:
                self.password = self.config.secret() if self.config.username else None
                self.state["attempts"] += 1
                _, protocol = await asyncio.wait_for(
                    loop.create_connection(lambda: _Protocol(self, loop), self.config.host, self.config.port,
                                           ssl=self._tls()), CONNECT_TIMEOUT_S)
                self._protocol = protocol
                try:
                    await asyncio.wait_for(asyncio.shield(protocol.connack), CONNECT_TIMEOUT_S)
                    if self.handlers:
                        protocol.write(subscribe_packet(protocol.packet_id(), [t.decode() for t in self.handlers]))
                    self.connected = connected = True
                    self.state.update(connected=True, last_error=None)
                    self._gauge(1)
                    log.info("stream connection up", extra={"client_id": self.client_id})
                    if not await self._serve(protocol):
                        # the broker (or the network) closed a working connection: counted as lost
                        self._failed("closed", f"the stream connection to {self.config.host}:{self.config.port} closed")
                finally:
                    self.connected = False
                    self.state["connected"] = False
                    self._gauge(0)
                    self._protocol = None
                    if not protocol.connack.done():
                        # a CONNACK that never came: nothing will read this future, so it must not
                        # end with an exception ("Future exception was never retrieved")
                        protocol.connack.cancel()
                    if protocol.transport is not None:
                        if not protocol.connack.cancelled() and not protocol.connack.exception():
                            protocol.transport.write(b"\xe0\x00")  # DISCONNECT
                        protocol.transport.close()
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError:
                self._failed("timeout", f"no answer from {self.config.host}:{self.config.port} within {CONNECT_TIMEOUT_S:g} s")
            except (OSError, ssl.SSLError, ConnectionError) as exc:
                self._failed(type(exc).__name__, f"stream connection to {self.config.host}:{self.config.port}: {exc}")
            except Exception as exc:  # noqa: BLE001 - the stream must outlive any one failure
                self._failed("error", f"{type(exc).__name__}: {exc}")
            if connected:
                delay = self.config.reconnect_min_s
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.config.reconnect_max_s)

    async def _serve(self, protocol: _Protocol) -> bool:
        """Keep the connection alive until it closes: PINGREQ every half keepalive, and a broker that
        stays silent for 1.5 keepalives is taken for gone. True when that loss was already counted."""
        keepalive = float(self.config.keepalive_s)
        while not protocol.closed.done():
            await asyncio.wait([protocol.closed], timeout=keepalive / 2)
            if protocol.closed.done():
                break
            if time.monotonic() - protocol.heard > 1.5 * keepalive:
                self._failed("silent", f"the broker sent nothing for {1.5 * keepalive:.0f} s")
                protocol.abort()
                log.info("stream connection down", extra={"client_id": self.client_id, "reason": "silent"})
                return True
            protocol.write(b"\xc0\x00")  # PINGREQ
        log.info("stream connection down", extra={"client_id": self.client_id, "reason": protocol.closed.result()})
        return False

    def _tls(self) -> ssl.SSLContext | None:
        cfg = self.config
        if not (cfg.tls or cfg.ca_file or cfg.cert_file):
            return None
        context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        if cfg.cert_file:
            context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        return context

    def _gauge(self, value: int) -> None:
        if self.metrics is not None:
            self.metrics.stream_connected.set(value)

    def _failed(self, reason: str, message: str) -> None:
        self.state.update(failures=self.state["failures"] + 1, last_error=message, connected=False)
        if self.metrics is not None:
            self.metrics.stream_failures.labels(reason).inc()
        now = time.monotonic()
        if now - self._logged.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[reason] = now
            log.warning("stream connection failed", extra={"reason": reason, "error": message,
                                                           "attempts": self.state["attempts"]})
