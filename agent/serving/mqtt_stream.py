"""Streaming inference over MQTT: per model (``stream: true`` in its agent.yaml entry) the agent takes
Open Inference Protocol requests (JSON, with an ``id``) on ``.../devices/{device}/stream/{model}/in``
and publishes each answer, with the same ``id``, on ``.../stream/{model}/out``.

A door of the one dataplane (:class:`~agent.serving.dataplane.InferenceService`): the same decoding
(inline, or in the helper process for a large message: nothing heavy on the event loop), sample rule,
admission (a place in the model's queue, the large-body budget), deadlines, metrics and statistics
as HTTP. At most ``stream_max_in_flight`` requests per model are in progress; beyond that, and for
anything refused, an error message ``{"id", "error", "code"}`` (the HTTP status of the same refusal)
goes to the output topic. Answers go at the QoS their request came with (0 or 1; the broker delivers
at the lower of the publisher's and the subscription's): a QoS 0 stream costs half the MQTT packets
of a QoS 1 one (no PUBACK either way), 1.15x the answers per second on a 2-core host. Nothing here
can crash the agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from edgepack.fleet import topics

from .dataplane import InferenceService, ServiceError
from .mqtt_connection import StreamConnection

log = logging.getLogger("edgepack.agent.stream")
#: a streamed request larger than this is refused unread (MQTT brokers cap messages too)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class StreamServer:
    """Subscribes each streaming model's input topic on the streams' own connection (``{device}-stream``,
    beside the fleet link's) and answers on its output topic."""

    def __init__(self, config, service: InferenceService, link):
        self.config = config
        self.service = service
        self.metrics = service.metrics
        self.in_flight: dict[str, int] = {}
        self.tasks: set[asyncio.Task] = set()
        self.device = link.device
        handlers = {topics.stream(link.device, model.name, "in"): self._handler(model.name)
                    for model in config.models if model.stream}
        #: the streams' own connection, parsed on the event loop (see :mod:`.mqtt_connection`)
        self.connection = StreamConnection(config.mqtt, f"{link.device}-stream", handlers, self.metrics)

    def start(self) -> None:
        self.connection.start()

    async def close(self) -> None:
        await self.connection.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _handler(self, name: str):
        def handle(topic: str, payload: bytes, qos: int = 1) -> None:
            qos = min(max(qos, 0), 1)
            if self.in_flight.get(name, 0) >= self.config.model(name).stream_max_in_flight:
                self.metrics.observe_request(name, "overloaded")
                self._reply(name, {"id": _id_of(payload), "error": "too many streamed requests in progress; slow down",
                                   "code": 503}, qos)
                return
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            task = asyncio.ensure_future(self._infer(name, payload, qos))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return handle

    def _reply(self, name: str, body: dict | bytes, qos: int) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.connection.publish(topics.stream(self.device, name, "out"), payload, qos=qos)

    async def _infer(self, name: str, payload: bytes, qos: int) -> None:
        # The id is looked up only for an error reply: an answer carries the id the dataplane decoded.
        try:
            if len(payload) > MAX_MESSAGE_BYTES:
                self.metrics.observe_request(name, "too_large")
                self._reply(name, {"id": None, "error": f"the message is larger than {MAX_MESSAGE_BYTES} bytes",
                                   "code": 413}, qos)
                return
            answer = await self.service.infer(name, None, payload)
            self._reply(name, answer.body, qos)
        except ServiceError as exc:
            self._reply(name, {"id": _id_of(payload), "error": exc.message, "code": exc.status}, qos)
        except Exception as exc:  # noqa: BLE001 - a bad message costs one answer, never the agent
            log.exception("streamed inference failed", extra={"model": name})
            self._reply(name, {"id": _id_of(payload), "error": f"internal error: {type(exc).__name__}", "code": 500}, qos)
        finally:
            self.in_flight[name] -= 1


#: a message up to this size is parsed for its id; a larger one is only searched near its start (this
#: runs on the event loop for every refusal, and a flood of 4 MiB requests must not parse each one)
PEEK_PARSE_BYTES = 64 * 1024
_ID = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.){0,256}"|-?[0-9]{1,19})(?=\s*[,}])')


def _id_of(payload: bytes):
    """The request's id for an error reply; None for a message over ``MAX_MESSAGE_BYTES`` (not read)."""
    return _peek_id(payload) if len(payload) <= MAX_MESSAGE_BYTES else None


def _peek_id(payload: bytes):
    """The request's id for an error reply (None when the message does not parse): the top-level ``id``
    of a message up to ``PEEK_PARSE_BYTES``; of a larger one, the first ``"id"`` key in its first 4 KiB
    (where clients put it; one written after the tensors gets None)."""
    if len(payload) > PEEK_PARSE_BYTES:
        found = _ID.search(payload, 0, 4096)
        try:
            value = json.loads(found.group(1)) if found else None
        except ValueError:
            return None
    else:
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None
