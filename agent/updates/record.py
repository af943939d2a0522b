"""What the updater remembers across restarts (``<store>/fleet/desired.json``): which desired-state
version each topic and each model last had accepted (and the digest of that document), the target
each model is wanted at, the targets that failed here, and the newest issue time seen (a clock floor).

The record is the device's anti-replay memory, so it **fails closed**: a record that exists but cannot
be read (a power cut, a worn SD card) blocks every update until an operator runs
``edgepack-agent reset-updates``; it is never silently replaced by empty counters, which would let a
replayed older desired state in.

:func:`check_desired` is the acceptance rule for one signed desired state, a pure function of the
record, the topic and the device's settings.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from edgepack.atomic import write_json_atomic
from edgepack.fleet import topics
from edgepack.fleet.desired import DesiredState, DesiredStateError, verify_desired

#: a device clock this far behind the newest issue time accepted is taken as wrong (no RTC, no NTP yet)
CLOCK_SLACK_S = 300.0
FIELDS = ("accepted", "digests", "models", "wanted", "failed")


class RecordCorrupt(Exception):
    """The record exists but cannot be read; updates are refused until an operator resets it."""


def _path(store_root: Path) -> Path:
    return Path(store_root) / "fleet" / "desired.json"


def read_record(store_root: Path) -> dict:
    """The record of a store (empty when none was written); raises RecordCorrupt when unreadable."""
    path = _path(store_root)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return empty_record()
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise RecordCorrupt(f"the update record {path} is unreadable ({type(exc).__name__}); updates are refused "
                            "until 'edgepack-agent reset-updates' is run") from None
    counters_ok = isinstance(data, dict) and all(
        isinstance(v, int) and not isinstance(v, bool)
        for key in ("accepted", "models") for v in (data.get(key) or {}).values()) if isinstance(data, dict) else False
    if (not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in FIELDS) or not counters_ok
            or not isinstance(data.get("clock", 0.0) or 0.0, (int, float))
            or not all(isinstance(t, dict) and isinstance(t.get("sha256"), str) for t in (data.get("wanted") or {}).values())):
        raise RecordCorrupt(f"the update record {path} is not what this agent writes; updates are refused until "
                            "'edgepack-agent reset-updates' is run")
    record = empty_record()
    record.update({k: dict(data.get(k, {})) for k in FIELDS})
    record["clock"] = float(data.get("clock") or 0.0)
    return record


def empty_record() -> dict:
    return {"accepted": {}, "digests": {}, "models": {}, "wanted": {}, "failed": {}, "clock": 0.0}


def save_record(store_root: Path, record: dict) -> None:
    write_json_atomic(_path(store_root), record)


def reset_record(store_root: Path, model_states: dict[str, dict]) -> Path | None:
    """Move a corrupt record aside and start a new one whose per-model counters are seeded from what
    the store's own state files say was accepted (so replays of those versions stay refused); the
    path the old record was moved to, or None when there was none."""
    path = _path(store_root)
    moved = None
    if path.exists():
        moved = path.with_name(f"desired.json.corrupt-{int(time.time())}")
        os.replace(path, moved)
    record = empty_record()
    for name, state in model_states.items():
        seen = [((state.get("update") or {}).get("target") or {}).get("desired_version") or 0]
        record["models"][name] = max(int(v) for v in seen if isinstance(v, (int, float)))
    save_record(store_root, record)
    return moved


def clock_now(record: dict) -> tuple[float, bool]:
    """The time to judge expiry by, and whether the device clock looks wrong: never earlier than the
    newest issue time accepted (a clock set back cannot revive an expired desired state)."""
    now = time.time()
    floor = record.get("clock") or 0.0
    return max(now, floor), now < floor - CLOCK_SLACK_S


def check_desired(record: dict, topic: str, payload: bytes, *, device: str, groups: list[str], keys,
                  profile: str | None) -> tuple[DesiredState, object] | None:
    """The state and this profile's bundle when ``payload`` is a new desired state to accept; None for
    the retained copy of the one accepted already; raises DesiredStateError (with its reason) else."""
    now, _ = clock_now(record)
    state = verify_desired(payload, keys, now=now)
    # The signed target must be the topic's: a group's (older) desired state replayed on the device
    # topic, or on another group's, is refused.
    if topic == topics.desired(device):
        if state.device != device:
            raise DesiredStateError("wrong-device", "desired state on this device's topic names "
                                    f"{'device ' + repr(state.device) if state.device else 'group ' + repr(state.group)}")
    elif state.group is None or topic != topics.group_desired(state.group) or state.group not in groups:
        raise DesiredStateError("wrong-group", f"desired state on {topic} names "
                                f"{'group ' + repr(state.group) if state.group else 'device ' + repr(state.device)}")
    # One version counter per topic and one per model, both only growing.
    topic_last = record["accepted"].get(topic, 0)
    if state.version == topic_last:
        if record["digests"].get(topic) in (None, state.digest):
            return None  # the retained copy of what was accepted already (after a reconnect or restart)
        raise DesiredStateError("reused-version", f"desired state version {state.version} was accepted before with "
                                "other contents; a new desired state needs a new version")
    last = max(topic_last, record["models"].get(state.model.name, 0))
    if state.version <= last:
        raise DesiredStateError("replayed", f"desired state version {state.version} is not newer than "
                                f"version {last} accepted before (a replayed message)")
    bundle = state.for_profile(profile)
    shadow = state.shadow.for_profile(profile) if state.shadow is not None else None
    from edgepack.fleet.chunks import CHUNK_BYTES

    for ref in (bundle, shadow):
        if ref is not None and ref.chunk_bytes != CHUNK_BYTES:
            raise DesiredStateError("malformed", f"the desired state lists chunks of {ref.chunk_bytes} bytes; this "
                                    f"agent fetches chunks of {CHUNK_BYTES}")
    state._shadow_bundle = shadow
    return state, bundle


def accept(record: dict, topic: str, state: DesiredState, bundle) -> dict:
    """Record ``state`` as accepted on ``topic``; the target it makes wanted."""
    name = state.model.name
    target = {"name": name, "version": state.model.version, "sha256": bundle.sha256, "size": bundle.size,
              "chunk_bytes": bundle.chunk_bytes, "chunks": bundle.chunks, "url": bundle.url,
              "probation": state.probation.model_dump(exclude_none=True) if state.probation else None,
              "desired_version": state.version, "topic": topic, "accepted_at": time.time(),
              "expires_at": state.expires_at, "shadow": None}
    shadow = getattr(state, "_shadow_bundle", None)
    if state.shadow is not None and shadow is not None:
        target["shadow"] = {"name": name, "version": state.shadow.version, "sha256": shadow.sha256, "size": shadow.size,
                            "chunk_bytes": shadow.chunk_bytes, "chunks": shadow.chunks, "url": shadow.url,
                            "sample_rate": state.shadow.sample_rate, "cpu_share": state.shadow.cpu_share}
    if state.renews is None or state.renews > record["models"].get(name, 0):
        # Pushing it again is how an operator retries; a renewal of an offer this device took is
        # not a new try (one of an offer it never saw — it was offline — is that offer).
        record["failed"].pop(bundle.sha256, None)
        if target["shadow"]:
            record["failed"].pop(target["shadow"]["sha256"], None)
    record["accepted"][topic] = state.version
    record["digests"][topic] = state.digest
    record["models"][name] = max(record["models"].get(name, 0), state.version)
    record["wanted"][name] = target
    # The clock floor moves with what the fleet signed, never beyond this device's own clock at the
    # time: one pusher whose clock runs far ahead cannot make every later desired state look expired,
    # and a clock set back afterwards (a reboot without RTC) cannot revive an expired one.
    record["clock"] = max(record.get("clock") or 0.0, min(state.issued_at, time.time()))
    return target
