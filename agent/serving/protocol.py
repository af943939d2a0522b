"""uvicorn's httptools protocol with a deadline on the request head and a front door.

**Head deadline (slow-loris clients).** uvicorn closes idle keep-alive connections, but a client that
connects and sends nothing, or trickles a header byte every few seconds, holds a connection (and a slot
of ``limit_concurrency``) forever: every byte received cancels the keep-alive timer. This protocol
closes a connection whose request head is not complete within ``header_timeout_s`` of the connection or
of the previous response.

**Front door.** Some answers are known as soon as the request head is parsed: a 503 for a model whose
queue is full, the health probes. Under a flood those are most of the traffic, and taking each through
an ASGI task and Starlette's middleware stack costs several times the model's own share of the event
loop, so the refusals themselves starve the requests that were accepted (goodput collapse) and the
health probes queue behind them. ``front_door(method, path, headers)`` (see ``agent.serving.app``)
returns a complete response for those, written straight to the transport; the rest of such a request's
body is read and dropped by the parser, and the connection stays open for the next request (unless
the client asked to close it: HTTP/1.0, ``Connection: close``, or ``Expect: 100-continue``, whose
body will not come). While the client is not reading its answers (the transport's write buffer is
full) the front door steps aside and uvicorn's own path applies its back-pressure, so a client that
pipelines probes without reading the replies cannot make the agent buffer answers without end.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

try:
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # h11 only
    httptools = HttpToolsProtocol = None

#: after an answer given before its request body was read, on a connection that closes: how long the
#: rest of the body is read and dropped (at most) before the close
LINGER_S = 5.0

log = logging.getLogger("edgepack.agent.serving")

#: ``front_door(method, raw_path, headers, scope) -> (status, headers, body[, refusal]) | None``: an
#: answer given without the ASGI application (``refusal``: an overload refusal, which may be held back),
#: or None to pass the request on (it may leave notes in ``scope``)
FrontDoor = Callable[[bytes, bytes, list, dict], "tuple | None"]

REASONS = {200: b"OK", 503: b"Service Unavailable"}


class _LingeringTransport:
    """The protocol's transport, except that ``close()`` while the request body is still arriving
    lingers: the answer (already written) is followed by a FIN (``write_eof``), the rest of the body is
    read and dropped, and the connection closes once the body is in, the client closes, or after
    :data:`LINGER_S`. Closing at once with unread bytes in the kernel's receive buffer makes it send a
    reset, and a client still sending (``Connection: close``: Python's urllib, curl scripts) then gets
    ECONNRESET instead of the 503 it was sent (the lingering-close problem of every HTTP server)."""

    def __init__(self, transport, protocol):
        self._transport = transport
        self._protocol = protocol
        self._lingering = False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def close(self) -> None:
        if self._lingering or self._transport.is_closing():
            return
        if not self._protocol._reading_body or self._protocol.expect_100_continue:
            self._transport.close()  # nothing unread is on its way (a client waiting for 100 sends no body)
            return
        self._lingering = True
        try:
            self._transport.resume_reading()  # uvicorn paused it while the unread body piled up
            if self._transport.can_write_eof():
                self._transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError, AttributeError):
            pass  # a transport that cannot half-close (TLS): the body is still read and dropped
        self._protocol._linger_timer = self._protocol.loop.call_later(LINGER_S, self._transport.close)

    def body_done(self) -> None:
        """The rest of the body is in: close now."""
        if self._lingering:
            self._transport.close()


class _Answered:
    """Stands in for uvicorn's request/response cycle of a request the front door answered: its
    response is complete, so the parser drops the rest of the body and the next request starts."""

    response_complete = True
    disconnected = False
    keep_alive = True

    class message_event:  # noqa: N801 - the attribute name uvicorn uses
        @staticmethod
        def set() -> None:
            pass


class _Refusing:
    """The cycle of a front-door refusal held back for ``refusal_delay_s``: the connection reads nothing
    more meanwhile, and what already came of the refused body is dropped (the ``body`` uvicorn appends
    to is nothing). Pipelined requests queue behind it in uvicorn's pipeline, as behind any unfinished
    response, so answers keep their order."""

    disconnected = False
    message_event = _Answered.message_event

    def __init__(self, keep_alive: bool):
        self.response_complete = False
        self.keep_alive = keep_alive  # uvicorn's shutdown() clears it: the connection closes after the answer

    body = property(lambda self: b"", lambda self, value: None)
    more_body = property(lambda self: True, lambda self, value: None)


def guarded_protocol(header_timeout_s: float, front_door: FrontDoor | None = None, refusal_delay_s: float = 0.0):
    """The protocol for ``uvicorn.Config(http=...)`` (a factory uvicorn calls like the class); "h11"
    when httptools is not installed (uvicorn's own protocol, without the head deadline or the front door).
    ``refusal_delay_s``: how long a front-door 503 is held back before it is written."""
    if HttpToolsProtocol is None:
        return "h11"
    return functools.partial(HeadDeadlineProtocol, header_timeout_s=header_timeout_s, front_door=front_door,
                             refusal_delay_s=refusal_delay_s)


if HttpToolsProtocol is not None:
    class HeadDeadlineProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with the head deadline and the front door (see the module's
        docstring); ``header_timeout_s`` and ``front_door`` come with each instance (:func:`guarded_protocol`)."""

        _head_timer = None

        _refusal_timer = None

        def __init__(self, *args, header_timeout_s: float, front_door: FrontDoor | None = None,
                     refusal_delay_s: float = 0.0, **kwargs):
            self.header_timeout_s = header_timeout_s
            self.front_door = front_door
            self.refusal_delay_s = refusal_delay_s
            super().__init__(*args, **kwargs)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

        _linger_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(_LingeringTransport(transport, self))
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            if self._refusal_timer is not None:
                self._refusal_timer.cancel()
                self._release_refusal()
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport._lingering:
                try:
                    self.parser.feed_data(data)  # the refused body: parsed to its end and dropped
                except Exception:  # noqa: BLE001 - garbage after the answer: just close
                    self.transport._transport.close()
                return
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._disarm()
            # Only a request that is next in line may be answered here (a pipelined one waits its turn),
            # and never a protocol upgrade.
            front_door = self.front_door
            if (front_door is not None and (self.cycle is None or self.cycle.response_complete)
                    and not self.flow.write_paused and not self.parser.should_upgrade()):
                try:
                    path = httptools.parse_url(self.url).path
                    # uvicorn refuses the request itself beyond limit_concurrency (its own 503, no
                    # dataplane): a place taken here would never be given back
                    at_limit = self.limit_concurrency is not None and (
                        len(self.connections) >= self.limit_concurrency or len(self.tasks) >= self.limit_concurrency)
                    answer = front_door(self.parser.get_method(), path, self.headers, None if at_limit else self.scope)
                except httptools.HttpParserInvalidURLError:
                    answer = None  # the application answers it as uvicorn always has
                except Exception:  # noqa: BLE001 - a bug here must cost the shortcut, not the connection
                    log.exception("front door failed; passing the request on")
                    answer = None
                if answer is not None:
                    self._answer(*answer)
                    return
            super().on_headers_complete()

        def _answer(self, status: int, headers: list, body: bytes, refused_by=None) -> None:
            keep_alive = (self.parser.get_http_version() == "1.1" and self.parser.should_keep_alive()
                          and not self.expect_100_continue)  # a client waiting for 100 may not send the body
            head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))]
            for name, value in (*self.server_state.default_headers, *headers):
                head += [name, b": ", value, b"\r\n"]
            head.append(b"content-length: %d\r\n" % len(body))
            if not keep_alive:
                head.append(b"connection: close\r\n")
            head += [b"\r\n", body]
            if refused_by is not None and self.refusal_delay_s:
                # A client that sends again as soon as it is refused (an unpaced flood) gets its refusal
                # later: the refusals it can make the loop write per second are bounded, so they cannot
                # starve the probes and the accepted work, and the held clients come back spread out
                # (ModelScheduler.hold_refusal). Nothing is held but the connection: no place, no body.
                refusing = self.cycle = _Refusing(keep_alive)
                self.flow.pause_reading()
                self._refused_by = refused_by
                self._refusal_timer = self.loop.call_later(refused_by.hold_refusal(self.refusal_delay_s),
                                                           self._refuse, refusing, b"".join(head))
                return
            self.transport.write(b"".join(head))
            self.cycle = _Answered()
            if keep_alive:
                self.on_response_complete()
            else:
                self.server_state.total_requests += 1
                self.transport.close()

        _refused_by = None  # the queue whose refusal is held back now

        def _release_refusal(self) -> None:
            self._refusal_timer = None
            refused_by, self._refused_by = self._refused_by, None
            if refused_by is not None:
                refused_by.refusal_released()

        def _refuse(self, refusing: _Refusing, data: bytes) -> None:
            self._release_refusal()
            if self.transport.is_closing():
                return
            self.transport.write(data)
            refusing.response_complete = True
            if refusing.keep_alive:
                self.on_response_complete()
            else:
                self.server_state.total_requests += 1
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # An answer given before its body arrived (a refusal): the head deadline starts once that
            # body is in (on_message_complete), so a slow upload of a refused body is not cut off.
            if not self.transport.is_closing() and not self._reading_body:
                self._arm()

        _reading_body = False  # between a request's first byte and the end of its body

        def on_message_begin(self) -> None:
            self._reading_body = True
            super().on_message_begin()

        def on_message_complete(self) -> None:
            self._reading_body = False
            if self.transport._lingering:
                self.transport.body_done()
                return
            super().on_message_complete()
            if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
                self._arm()
