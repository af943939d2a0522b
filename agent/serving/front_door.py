"""Answers given from the request head alone, before the ASGI application (see
``agent.serving.protocol``): the health probes, and 503 for an inference request to a model whose
queue is full. Under a flood those are most requests; this keeps their cost a small fraction of an
accepted request's, so refusing never starves the accepted work or the probes.

The path parser and the bearer-token check here are the application's too (``app.BearerAuth``), so
the two cannot drift apart.
"""

from __future__ import annotations

import hmac

import orjson

from .scheduler import Overloaded
from .split import served_versions

#: Paths open without a token: liveness/readiness probes reveal nothing about models or data.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
_JSON = [(b"content-type", b"application/json")]


def token_matches(headers, expected: bytes) -> bool:
    """Whether the request's ``Authorization`` header is ``expected`` (``Bearer <token>``), in constant
    time (no token-prefix oracle). With several such headers the last one counts, as a dict of the
    headers (Starlette's) reads them."""
    given = b""
    for name, value in headers:
        if name == b"authorization":
            given = value
    return hmac.compare_digest(given, expected)


def infer_path(path: bytes) -> tuple[str, str | None] | None:
    """``(model, version or None)`` of ``/v2/models/NAME[/versions/V]/infer``; None for any other path
    (or a percent-encoded one: the application decodes and routes those)."""
    if not path.startswith(b"/v2/models/") or not path.endswith(b"/infer") or b"%" in path:
        return None
    parts = path.split(b"/")  # b"", b"v2", b"models", NAME, [b"versions", VERSION,] b"infer"
    if len(parts) == 5:
        return parts[3].decode("latin-1"), None
    if len(parts) == 7 and parts[4] == b"versions":
        return parts[3].decode("latin-1"), parts[5].decode("latin-1")
    return None


#: the scope key of a queue place taken from the request head: ``(scheduler, place)``, for the dataplane
PLACE = "edgepack.place"


def build_front_door(config, registry, metrics):
    """``front_door(method, path, headers, scope) -> (status, headers, body) | None``. Anything it does
    not answer (including a request whose bearer token is wrong: 401 from the application) passes on;
    an infer request it admits passes on with its queue place in ``scope[PLACE]``, taken here, so the
    requests whose heads arrive together cannot all pass a check that only one place is left for (the
    rest would be refused later, through the whole application)."""
    token = config.server.bearer_token()
    expected = f"Bearer {token}".encode() if token else None

    def front_door(method: bytes, path: bytes, headers: list, scope: dict | None = None):
        if method == b"GET":
            if path == b"/v2/health/live":
                return 200, _JSON, b'{"live":true}'
            if path == b"/v2/health/ready":
                ok = registry.ready
                return (200 if ok else 503), _JSON, b'{"ready":true}' if ok else b'{"ready":false}'
            return None
        target = infer_path(path) if method == b"POST" else None
        if target is None:
            return None
        scheduler = registry.get(target[0])
        if scheduler is None or (target[1] is not None and target[1] not in served_versions(scheduler)):
            return None  # 404 from the application
        if expected is not None and not token_matches(headers, expected):
            return None  # 401 from the application; the queue's state is not for strangers
        try:
            if scope is None:
                scheduler.check_capacity()
            else:
                scope[PLACE] = (scheduler, scheduler.reserve())
        except Overloaded as exc:
            metrics.observe_request(scheduler.name, "overloaded")
            # the fourth element: the queue that refused (the refusal is held back: server.refusal_delay_ms)
            return (503, [*_JSON, (b"retry-after", str(exc.retry_after).encode())], orjson.dumps({"error": str(exc)}),
                    scheduler)
        return None

    return front_door
