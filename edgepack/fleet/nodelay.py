"""TCP_NODELAY for paho's sockets (paho leaves Nagle's algorithm on).

MQTT messages are small and answered: with Nagle on, a message written while the previous one is not
yet acknowledged waits for that ACK, which the peer delays by up to 40 ms (delayed ACKs), per hop. A
streamed inference measured 88 ms a round trip over loopback that way, whatever the model's speed.
"""

from __future__ import annotations

import socket


def no_delay(client, userdata, sock) -> None:
    """paho's ``on_socket_open`` callback: turn Nagle's algorithm off on the new socket."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (a WebSocket wrapper, a Unix socket): nothing to turn off
