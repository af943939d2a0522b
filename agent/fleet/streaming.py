"""Streaming inference over MQTT: per model (``stream: true`` in its agent.yaml entry) the agent takes
Open Inference Protocol requests (JSON, with an ``id``) on ``.../devices/{device}/stream/{model}/in``
and publishes each answer, with the same ``id``, on ``.../stream/{model}/out``.

Requests go through the same decoding, validation, admission control and scheduler as HTTP. At most
``stream_max_in_flight`` requests per model are in progress; beyond that, and for anything malformed,
an error message ``{"id", "error", "code"}`` goes to the output topic. Nothing here can crash the agent.
"""

from __future__ import annotations

import asyncio
import json
import logging

from edgepack.errors import DataError, EdgepackError
from edgepack.fleet import topics

from ..serving.oip import RequestError, decode_request, encode_response, validate_inputs
from ..serving.scheduler import DeadlineExceeded, Overloaded

log = logging.getLogger("edgepack.agent.stream")
#: a streamed request larger than this is refused unread (MQTT brokers cap messages too)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class StreamServer:
    """Subscribes the link to each streaming model's input topic and answers on its output topic."""

    def __init__(self, config, registry, metrics, link):
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.link = link
        self.in_flight: dict[str, int] = {}
        self.tasks: set[asyncio.Task] = set()
        for model in config.models:
            if model.stream:
                link.handlers[topics.stream(link.device, model.name, "in")] = self._handler(model.name)

    def _handler(self, name: str):
        def handle(topic: str, payload: bytes) -> None:
            request_id = _peek_id(payload) if len(payload) <= MAX_MESSAGE_BYTES else None
            if self.in_flight.get(name, 0) >= self.config.model(name).stream_max_in_flight:
                self.metrics.observe_request(name, "overloaded")
                self._reply(name, {"id": request_id, "error": "too many streamed requests in progress; slow down",
                                   "code": 503})
                return
            self.in_flight[name] = self.in_flight.get(name, 0) + 1
            task = asyncio.ensure_future(self._infer(name, payload, request_id))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return handle

    def _reply(self, name: str, body: dict | bytes) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.link.transport.publish(topics.stream(self.link.device, name, "out"), payload, qos=1)

    async def _infer(self, name: str, payload: bytes, request_id) -> None:
        options = self.config.model(name)
        try:
            if len(payload) > MAX_MESSAGE_BYTES:
                raise RequestError(f"the message is larger than {MAX_MESSAGE_BYTES} bytes")
            scheduler = self.registry.get(name)
            if scheduler is None:
                raise EdgepackError(f"model {name!r} is not loaded")
            served = scheduler.pin()
            try:
                decoded = decode_request(payload, None)
                feeds = validate_inputs(decoded.inputs, served.model.inputs, options.nonfinite_inputs == "allow")
                first = next(iter(feeds.values()))
                if first.ndim and len(first) > options.max_samples_per_request:
                    raise RequestError(f"the request carries {len(first)} samples; at most "
                                       f"{options.max_samples_per_request} per request")
                result = await scheduler.infer(feeds, served)
            finally:
                scheduler.unpin(served)
            body, _ = encode_response(name, result.version, decoded, result.outputs, result.served.model.outputs)
            self.metrics.observe_request(name, "ok")
            self._reply(name, body)
        except Overloaded as exc:
            self.metrics.observe_request(name, "overloaded")
            self._reply(name, {"id": request_id, "error": str(exc), "code": 503})
        except DeadlineExceeded as exc:
            self.metrics.observe_request(name, "deadline_exceeded")
            self._reply(name, {"id": request_id, "error": str(exc), "code": 504})
        except (RequestError, DataError) as exc:
            self.metrics.observe_request(name, "bad_request")
            self._reply(name, {"id": request_id, "error": str(exc), "code": 400})
        except EdgepackError as exc:
            self.metrics.observe_request(name, "error")
            self._reply(name, {"id": request_id, "error": exc.message, "code": 500})
        except Exception as exc:  # noqa: BLE001 - a bad message costs one answer, never the agent
            self.metrics.observe_request(name, "error")
            log.exception("streamed inference failed", extra={"model": name})
            self._reply(name, {"id": request_id, "error": f"internal error: {type(exc).__name__}", "code": 500})
        finally:
            self.in_flight[name] -= 1


def _peek_id(payload: bytes):
    """The request's id for an error reply (None when the message does not parse)."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, (str, int)) else None
