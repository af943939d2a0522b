"""A/B: a share of a model's requests answered by a second version, sticky per client.

A request that names its client (the ``edgepack-client-id`` header or gRPC metadata, or the
``client_id`` request parameter) is routed by a hash of the model name and that id, so one client
always meets the same version, across restarts too; a request without one is routed at random. The
B version queues in the model's own scheduler (one queue, one admission), pinned as any version is.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np

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


def served_versions(scheduler) -> list[str]:
    """The versions of a model that answer requests: the active one, and an A/B split's B version."""
    versions = [scheduler.current.version]
    if scheduler.split is not None and scheduler.split.version != versions[0]:
        versions.append(scheduler.split.version)
    return versions


def candidate_problem(active, candidate) -> str | None:
    """Why ``candidate`` (a LoadedModel) cannot stand beside ``active`` as its shadow or B version: it
    must be the same model taking the same requests and giving the same outputs; None when it can."""
    def inputs(model):
        return [(s.name, s.dtype, tuple(s.shape), s.sample_axis, str(s.quantization or ""))
                for s in model.inputs]

    if candidate.name != active.name:
        return f"it is model {candidate.name!r}, not {active.name!r}"
    if candidate.version == active.version:
        return f"it is the active version ({active.version})"
    if inputs(candidate) != inputs(active):
        return "its inputs differ from the active version's (a candidate must take the same requests)"
    if sorted(s.name for s in candidate.outputs) != sorted(s.name for s in active.outputs):
        return "its outputs differ from the active version's"
    mine, theirs = candidate.backend.defaults, active.backend.defaults
    if set(mine) != set(theirs) or any(not np.array_equal(mine[k], theirs[k]) for k in mine):
        return "its constant inputs' defaults differ from the active version's"
    return None


def client_of(parameters: dict | None, header: str | None) -> str | None:
    """The request's client id: its ``client_id`` parameter, else the door's header or metadata."""
    value = (parameters or {}).get(CLIENT_PARAMETER)
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
        return str(value)
    return header or None
