"""The MQTT streams' own connection (agent/serving/mqtt_connection.py): its parser fed every split of
real packets, and a real Mosquitto that restarts, sends an oversized message and QoS 0 and 1 requests."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import paho.mqtt.client as mqtt

from agent.serving.metrics import ServingMetrics
from agent.serving.mqtt_connection import StreamConnection, _Protocol, remaining_length

from .broker import Broker


def _config(port: int, **extra):
    values = dict(host="127.0.0.1", port=port, keepalive_s=5, username=None, tls=False, ca_file=None, cert_file=None,
                  key_file=None, reconnect_min_s=0.1, reconnect_max_s=0.5, max_packet_bytes=160 * 1024)
    values.update(extra)
    return SimpleNamespace(**values, secret=lambda: None)


def _publish(topic: str, payload: bytes, qos: int, packet_id: int = 7) -> bytes:
    name = len(topic).to_bytes(2, "big") + topic.encode()
    head = name + (packet_id.to_bytes(2, "big") if qos else b"")
    return bytes([0x30 | qos << 1]) + remaining_length(len(head) + len(payload)) + head + payload


class _Transport:
    def __init__(self):
        self.written, self.aborted = [], False

    def write(self, data):
        self.written.append(bytes(data))

    def abort(self):
        self.aborted = True

    def get_extra_info(self, name):
        return None


def test_the_parser_takes_packets_split_anywhere_and_skips_oversized_ones_unbuffered():
    loop = asyncio.new_event_loop()
    try:
        got = []
        owner = StreamConnection(_config(1, max_packet_bytes=160 * 1024), "d-stream",
                                 {"a/in": lambda topic, payload, qos: got.append((topic, payload, qos))})
        big = _publish("a/in", b"x" * (200 * 1024), 1, 9)
        stream = (b"\x20\x02\x00\x00" + _publish("a/in", b'{"id": 1}', 1) + big + _publish("a/in", b"q0", 0)
                  + _publish("other", b"ignored", 0) + b"\xd0\x00" + _publish("a/in", b"\xff" * 300, 1, 8))
        for step in (1, 2, 3, 7, 1000, len(stream)):
            got.clear()
            protocol = _Protocol(owner, loop)
            protocol.transport = _Transport()
            for start in range(0, len(stream), step):
                protocol.data_received(stream[start:start + step])
            assert got == [("a/in", b'{"id": 1}', 1), ("a/in", b"q0", 0), ("a/in", b"\xff" * 300, 1)], step
            assert protocol.connack.result() is True and not protocol.transport.aborted
            assert len(protocol._buffer) < 1024 and protocol._skip == 0  # the 200 KiB message was never held
            protocol._flush()
            # a PUBACK for each QoS 1 request that was read (the oversized one is dropped unacknowledged,
            # as paho drops it; the broker sends it again on a later connection only with a session)
            assert b"".join(protocol.transport.written) == b"\x40\x02\x00\x07" + b"\x40\x02\x00\x08"
        assert owner.dropped == 6
        # a malformed length (five continuation bytes) closes the connection
        protocol = _Protocol(owner, loop)
        protocol.transport = _Transport()
        protocol.data_received(b"\x30\xff\xff\xff\xff\x01")
        assert protocol.transport.aborted
    finally:
        loop.close()


def test_streams_reconnect_after_a_broker_restart_and_answer_at_the_request_qos(tmp_path):
    broker = Broker(tmp_path / "broker")
    answers: list = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="peer")
    client.on_message = lambda c, u, m: answers.append((m.payload, m.qos))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    metrics = ServingMetrics()
    try:
        holder = {}

        def echo(topic, payload, qos):
            holder["connection"].publish("dev/out", payload.upper(), qos)

        async def make():
            connection = StreamConnection(_config(broker.port), "dev-stream", {"dev/in": echo}, metrics)
            holder["connection"] = connection
            connection.start()

        asyncio.run_coroutine_threadsafe(make(), loop).result(5)
        connection = holder["connection"]

        def wait(predicate, what, timeout=15):
            deadline = time.monotonic() + timeout
            while not predicate():
                assert time.monotonic() < deadline, what
                time.sleep(0.05)

        def peer():
            client.connect("127.0.0.1", broker.port)
            client.subscribe("dev/out", 1)
            client.loop_start()

        peer()
        wait(lambda: connection.connected, "connected")
        time.sleep(0.3)
        client.publish("dev/in", json.dumps({"id": "a"}), qos=1)
        client.publish("dev/in", b"q0", qos=0)
        client.publish("dev/in", b"y" * (200 * 1024), qos=1)  # over max_packet_bytes: dropped
        client.publish("dev/in", b"after", qos=1)
        wait(lambda: len(answers) >= 3, "three answers")
        assert sorted(answers) == sorted([(b'{"ID": "A"}', 1), (b"Q0", 0), (b"AFTER", 1)])
        assert connection.dropped == 1
        assert metrics.registry.get_sample_value("edgepack_mqtt_dropped_messages_total", {"reason": "stream_too_large"}) == 1
        assert metrics.registry.get_sample_value("edgepack_mqtt_stream_connected") == 1

        client.loop_stop()
        client.disconnect()
        broker.stop()
        wait(lambda: not connection.connected, "the cut is seen")
        broker.start()
        wait(lambda: connection.connected, "reconnected")
        answers.clear()
        peer()
        time.sleep(0.3)
        client.publish("dev/in", b"again", qos=1)
        wait(lambda: answers, "an answer after the restart")
        assert answers == [(b"AGAIN", 1)]
        assert connection.state["attempts"] >= 2 and connection.state["connected"]
        # the cut is counted as a lost connection, and the gauge is back up
        assert metrics.registry.get_sample_value("edgepack_mqtt_stream_connect_failures_total", {"reason": "closed"}) >= 1
        assert metrics.registry.get_sample_value("edgepack_mqtt_stream_connected") == 1
        asyncio.run_coroutine_threadsafe(connection.close(), loop).result(5)
        assert not connection.connected
    finally:
        if "connection" in holder:
            asyncio.run_coroutine_threadsafe(holder["connection"].close(), loop).result(5)
        client.loop_stop()
        client.disconnect()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        broker.stop()


def test_a_broker_that_never_sends_connack_is_retried_without_leaking_futures(monkeypatch):
    """A listener that accepts and never answers CONNECT (a wedged broker, a wrong port behind a
    proxy): each attempt times out, counts as a failure, and leaves no future whose exception nobody
    reads (asyncio would log "Future exception was never retrieved")."""
    import gc
    import socket

    from agent.serving import mqtt_connection

    monkeypatch.setattr(mqtt_connection, "CONNECT_TIMEOUT_S", 0.3)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    leaked: list = []
    metrics = ServingMetrics()

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: leaked.append(context.get("message")))
        config = _config(listener.getsockname()[1])
        config.reconnect_min_s = config.reconnect_max_s = 0.05
        connection = StreamConnection(config, "dev-stream", {"dev/in": lambda *a: None}, metrics)
        connection.start()
        deadline = time.monotonic() + 15
        while connection.state["failures"] < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await connection.close()
        gc.collect()
        await asyncio.sleep(0.1)
        return connection

    try:
        connection = asyncio.run(main())
    finally:
        listener.close()
    assert not connection.connected and connection.state["failures"] >= 3
    assert "within 0.3 s" in connection.state["last_error"]
    assert metrics.registry.get_sample_value("edgepack_mqtt_stream_connect_failures_total", {"reason": "timeout"}) >= 3
    assert metrics.registry.get_sample_value("edgepack_mqtt_stream_connected") == 0
    assert not leaked, leaked


def test_a_connection_lost_before_its_connack_was_awaited_logs_nothing():
    """A connect that timed out after the socket was made: asyncio closes the transport, the protocol
    sees connection_lost, and nothing ever awaits its CONNACK. That future must not end with an
    exception nobody reads (asyncio would log "Future exception was never retrieved")."""
    import gc

    leaked: list = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: leaked.append(context.get("message")))
        protocol = _Protocol(SimpleNamespace(), loop)
        protocol.connection_lost(None)
        assert isinstance(protocol.connack.exception(), ConnectionError)  # an awaiting attempt still sees it
        fresh = _Protocol(SimpleNamespace(), loop)
        fresh.connection_lost(OSError("reset"))
        del protocol, fresh
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert not leaked, leaked
