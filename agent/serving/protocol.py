"""uvicorn's httptools protocol with a deadline on the request head (slow-loris clients).

uvicorn closes idle keep-alive connections, but a client that connects and sends nothing, or trickles
a header byte every few seconds, holds a connection (and a slot of ``limit_concurrency``) forever:
every byte received cancels the keep-alive timer. This protocol closes a connection whose request
head is not complete within ``header_timeout_s`` of the connection or of the previous response.
"""

from __future__ import annotations


def guarded_protocol(header_timeout_s: float):
    """The protocol class for ``uvicorn.Config(http=...)``; "h11" when httptools is not installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # h11 only: uvicorn's own protocol, without the head deadline
        return "h11"

    class HeadDeadlineProtocol(HttpToolsProtocol):
        _head_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return HeadDeadlineProtocol
