"""A/B: a share of a model's requests answered by a second version, sticky per client.

A request that names its client (the ``edgepack-client-id`` header or gRPC metadata, or the
``client_id`` request parameter) is routed by a hash of the model name and that id, so one client
always meets the same version, across restarts too; a request without one is routed at random. The
B version queues in the model's own scheduler (one queue, one admission), pinned as any version is.
"""

from __future__ import annotations

import hashlib
import random

#: where a request names its client
CLIENT_HEADER = "edgepack-client-id"
CLIENT_PARAMETER = "client_id"


def bucket(model: str, client: str) -> float:
    """The client's place in [0, 1) for this model (blake2b of both: uniform, and stable everywhere)."""
    digest = hashlib.blake2b(f"{model}\0{client}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


class Split:
    """The B version of a model and the share of requests it answers."""

    def __init__(self, model: str, served, percent: float):
        self.model = model
        self.served = served
        self.percent = percent

    @property
    def version(self) -> str:
        return self.served.version

    def takes(self, client: str | None) -> bool:
        """Whether the B version answers a request from ``client`` (None: a random request)."""
        place = bucket(self.model, client) if client else random.random()
        return place * 100 < self.percent

    def close(self) -> None:
        self.served.retire()


def client_of(parameters: dict | None, header: str | None) -> str | None:
    """The request's client id: its ``client_id`` parameter, else the door's header or metadata."""
    value = (parameters or {}).get(CLIENT_PARAMETER)
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
        return str(value)
    return header or None
