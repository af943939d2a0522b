"""The HTTP protocol's front door, byte for byte: answers from the request head with the ASGI
application never called, pipelined requests in order, the refused body dropped, keep-alive or close as
the client asked, and uvicorn's own path (with its back-pressure) while the client is not reading.
A stand-in transport records what is written; the daemon tests run the same class on real sockets."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("httptools")

import uvicorn  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from agent.serving.protocol import guarded_protocol  # noqa: E402

JSON = [(b"content-type", b"application/json")]


class Transport:
    """What uvicorn's protocol needs of a transport; records writes and closing."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    eof = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True


class _Queue:
    """The refusing queue's side of a held refusal (ModelScheduler.hold_refusal): holds as long as asked."""

    def __init__(self):
        self.holding = self.held = 0

    def hold_refusal(self, longest_s: float) -> float:
        self.holding += 1
        self.held += 1
        return longest_s

    def refusal_released(self) -> None:
        self.holding -= 1


QUEUE = _Queue()


def front_door(method: bytes, path: bytes, headers: list, scope=None):
    if method == b"GET" and path == b"/live":
        return 200, JSON, b'{"live":true}'
    if method == b"POST" and path == b"/full":
        return 503, [*JSON, (b"retry-after", b"2")], b'{"error":"full"}', QUEUE  # an overload refusal
    if method == b"GET" and path == b"/notready":
        return 503, JSON, b'{"ready":false}'
    return None


def _connection(loop, refusal_delay_s: float = 0.0):
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol_class = guarded_protocol(10.0, front_door, refusal_delay_s)
    config = uvicorn.Config(app, http=protocol_class, lifespan="off", log_config=None)
    state = ServerState()
    state.default_headers = [(b"date", b"Tue, 24 Nov 2026 10:00:00 GMT")]  # what a started server sets
    protocol = protocol_class(config=config, server_state=state, app_state={}, _loop=loop)
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport, state, calls


def _responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        length = int(headers[b"content-length"])
        answers.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return answers


def test_front_door_answers_pipelined_requests_in_order_and_drops_refused_bodies():
    loop = asyncio.new_event_loop()
    try:
        protocol, transport, state, calls = _connection(loop)
        body = b"x" * 5000
        refused = b"POST /full HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n"
        stream = b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n" + refused + body + b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n"
        # In pieces, the refused body split across them, as a socket delivers it.
        for start in range(0, len(stream), 1000):
            protocol.data_received(stream[start:start + 1000])
        answers = _responses(bytes(transport.written))
        assert [(status, payload) for status, _, payload in answers] == [
            (200, b'{"live":true}'), (503, b'{"error":"full"}'), (200, b'{"live":true}')]
        assert answers[1][1][b"retry-after"] == b"2" and b"date" in answers[1][1]
        assert all(b"connection" not in headers for _, headers, _ in answers)  # kept alive
        assert not transport.closed and transport.reading and state.total_requests == 3
        assert calls == []  # the application never ran
        # The next request the front door does not answer goes to the application on the same connection.
        protocol.data_received(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
        loop.run_until_complete(asyncio.sleep(0.01))
        assert calls == ["/other"] and _responses(bytes(transport.written))[-1][2] == b"ok"
    finally:
        loop.close()


def test_a_held_back_refusal_comes_after_its_delay_and_keeps_pipelined_answers_in_order():
    loop = asyncio.new_event_loop()
    try:
        protocol, transport, state, calls = _connection(loop, refusal_delay_s=0.05)
        held_before = QUEUE.held
        refused = b"POST /full HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n" + b"x" * 3000
        # a refused request, then (pipelined in the same bytes) a probe and one for the application
        protocol.data_received(refused[:1200])
        assert not transport.written and not transport.reading  # held back; nothing more is read meanwhile
        protocol.data_received(refused[1200:] + b"GET /live HTTP/1.1\r\nHost: a\r\n\r\nGET /other HTTP/1.1\r\nHost: a\r\n\r\n")
        assert not transport.written
        started = loop.time()
        while not transport.written and loop.time() - started < 2:
            loop.run_until_complete(asyncio.sleep(0.01))
        assert loop.time() - started >= 0.03
        loop.run_until_complete(asyncio.sleep(0.05))
        answers = _responses(bytes(transport.written))
        # the pipelined requests queued behind the refusal in uvicorn's pipeline (the application answers
        # them, as any request pipelined behind an unfinished response), in order
        assert [(status, payload) for status, _, payload in answers] == [
            (503, b'{"error":"full"}'), (200, b"ok"), (200, b"ok")]
        assert calls == ["/live", "/other"] and transport.reading and not transport.closed
        assert QUEUE.held == held_before + 1 and QUEUE.holding == 0  # held once, released when written
        # a 503 that is not an overload refusal (readiness) is never held back
        probe, probed, _, _ = _connection(loop, refusal_delay_s=0.05)
        probe.data_received(b"GET /notready HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _responses(bytes(probed.written))[0][:1] == (503,)
        # a connection that goes away meanwhile gets nothing written and leaves no timer behind
        protocol2, transport2, _, _ = _connection(loop, refusal_delay_s=0.05)
        protocol2.data_received(refused)
        assert QUEUE.holding == 1
        protocol2.connection_lost(None)
        assert QUEUE.holding == 0  # the queue no longer counts a client coming back
        loop.run_until_complete(asyncio.sleep(0.1))
        assert not transport2.written and QUEUE.holding == 0
    finally:
        loop.close()


@pytest.mark.parametrize("request_head", [
    b"GET /live HTTP/1.0\r\n\r\n",
    b"GET /live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    # The client waits for 100 Continue before sending its body; after a final answer it will not.
    b"POST /full HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
])
def test_front_door_closes_when_the_client_asked_or_its_body_will_not_come(request_head):
    loop = asyncio.new_event_loop()
    try:
        protocol, transport, state, calls = _connection(loop)
        protocol.data_received(request_head)
        ((status, headers, _),) = _responses(bytes(transport.written))
        assert status in (200, 503) and headers[b"connection"] == b"close"
        assert transport.closed and state.total_requests == 1 and calls == []
    finally:
        loop.close()


def test_front_door_steps_aside_while_the_client_is_not_reading_its_answers():
    loop = asyncio.new_event_loop()
    try:
        protocol, transport, state, calls = _connection(loop)
        protocol.pause_writing()  # the transport's write buffer is full
        protocol.data_received(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n")
        assert transport.written == b""  # nothing more is buffered for this client
        protocol.resume_writing()
        loop.run_until_complete(asyncio.sleep(0.01))
        assert calls == ["/live"]  # uvicorn's own path answered it, with its back-pressure
    finally:
        loop.close()


def test_a_refusal_while_the_body_arrives_half_closes_and_drains_before_closing():
    """Connection: close and a body still on its way: the 503 goes out with a FIN (write_eof), the rest
    of the body is read and dropped, and only then is the connection closed (closing on unread bytes
    makes the kernel answer with a reset, and the client never reads its 503)."""
    loop = asyncio.new_event_loop()
    try:
        protocol, transport, state, calls = _connection(loop)
        protocol.data_received(b"POST /full HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 100\r\n\r\n"
                               + b"x" * 10)
        ((status, headers, _),) = _responses(bytes(transport.written))
        assert status == 503 and headers[b"connection"] == b"close"
        assert transport.eof and not transport.closed  # half-closed, still reading
        protocol.data_received(b"x" * 50)
        assert not transport.closed
        protocol.data_received(b"x" * 40)  # the body is in: closed now
        assert transport.closed and calls == []
        assert len(_responses(bytes(transport.written))) == 1
    finally:
        loop.close()
