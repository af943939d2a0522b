"""MQTT topics of the fleet protocol (DESIGN.md §8): at most 7 levels, so AWS IoT Core works too."""

from __future__ import annotations

from edgepack.bundle.format import is_valid_name

PREFIX = "edgepack/v1"
#: JSON payload schema version of every message on these topics
SCHEMA = 1


def device(device_id: str, leaf: str) -> str:
    """``edgepack/v1/devices/{device}/{leaf}`` (leaf: state, telemetry, events, desired, chunks/req…)."""
    return f"{PREFIX}/devices/{device_id}/{leaf}"


def group_desired(group: str) -> str:
    """The retained desired state of a group."""
    return f"{PREFIX}/groups/{group}/desired"


def state(device_id: str) -> str:
    return device(device_id, "state")


def telemetry(device_id: str) -> str:
    return device(device_id, "telemetry")


def events(device_id: str) -> str:
    return device(device_id, "events")


def desired(device_id: str) -> str:
    return device(device_id, "desired")


def chunk_requests(device_id: str) -> str:
    """agent -> fleet: which chunks of which bundle to send."""
    return device(device_id, "chunks/req")


def chunk_data(device_id: str) -> str:
    """fleet -> agent: one chunk per message (a binary frame, see edgepack.fleet.chunks)."""
    return device(device_id, "chunks/data")


def stream(device_id: str, model: str, leaf: str) -> str:
    """Streaming inference: ``.../stream/{model}/in`` and ``.../stream/{model}/out``."""
    return device(device_id, f"stream/{model}/{leaf}")


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """(device id, leaf) of a device topic, or None for any other topic."""
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:2]) != PREFIX or parts[2] != "devices":
        return None
    return parts[3], "/".join(parts[4:])


def check_id(kind: str, value: str) -> str:
    """A device or group id usable as one topic level (no '/', '+', '#')."""
    if not is_valid_name(value):
        from edgepack.errors import UsageError

        raise UsageError(f"{kind} id {value!r} must be letters, digits, '.', '_' or '-' (at most 128)")
    return value
