"""Staged rollouts and fleet rollbacks: a tick-driven state machine whose whole state lives in the
database (hawkBit's model), so a controller killed with ``kill -9`` resumes on its next tick without
offering a finished device again.

A rollout offers a release to a set of devices (a group, a tag or a list) in stages (``1%,10%,100%``
or counts, each soaked for a while) or at a rate that grows (``10/min`` x ``2`` per minute, AWS IoT
Jobs' exponential rollout). Each offer is a signed desired state for one device, naming only that
device's profile's bundle and carrying the rollout's probation budget, so the device enforces the
budget itself, offline. Each tick:

1. reads what every offered device reports (committed, failed, timed out);
2. **aborts** on install failures (a percentage of the finished devices, after a minimum number) and
   on **model metrics**: the updated devices against the devices still on the old version, over the
   same window and profile (p95 latency ratio, error-rate delta, drift-alarm share delta, PSI of the
   predicted classes) — the numbers go into the verdicts ``rollout show`` prints;
3. offers the next devices when the stage is finished and soaked and its verdict passes.

An abort stops offering and rolls every updated device back to the version it came from, **from the
slot it still holds**: the rollback desired state names the old release's bundle, which the device
finds in its inactive slot and activates without a download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time

from sqlalchemy import func, select, text, update

from edgepack.errors import UsageError

from . import shadow_stage, topics
from .db import (chunked, desired, devices, lease_held, rollout_classes_query, rollout_devices, rollouts, rollups,
                 take_lease)
from .releases import release
from .registry import device_groups

log = logging.getLogger("edgepack.fleet.rollouts")
#: statuses of a device in a rollout that are final for its offer
FINISHED = ("committed", "failed", "timed_out")
#: statuses that wait for the device
WAITING = ("offered", "rollback_offered", shadow_stage.OFFERED)
DEFAULT_STRATEGY = {"stages": [{"percent": 10.0}, {"percent": 100.0}], "soak_s": 60.0, "min_devices": 1,
                    "device_timeout_s": 1800.0, "retries": 0, "expires_s": 86400.0}
DEFAULT_CRITERIA = {"max_failure_pct": 20.0, "min_finished": 5, "min_requests": 100, "window_s": 600.0}
#: metric budgets and the verdict field each one limits
METRIC_LIMITS = {"max_latency_ratio": "latency_ratio", "max_error_delta": "error_delta",
                 "max_drift_delta": "drift_delta", "max_prediction_psi": "prediction_psi"}


# -- parsing the command line ----------------------------------------------------------------------

def parse_stages(text: str) -> list[dict]:
    """``1%,10%,100%`` or ``5,20,100`` (counts) -> stage list; ``shadow:10%`` is a shadow stage (the
    release runs in shadow on those devices and is promoted by the stages after it)."""
    stages = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        shadow = part.lower().startswith("shadow:")
        part = part.split(":", 1)[1].strip() if shadow else part
        try:
            if part.endswith("%"):
                value = float(part[:-1])
                if not 0 < value <= 100:
                    raise ValueError
                stages.append({"percent": value})
            else:
                value = int(part)
                if value < 1:
                    raise ValueError
                stages.append({"count": value})
        except ValueError:
            raise UsageError(f"--stages {text!r}: give percentages (1%,10%,100%) or device counts (5,20,100), "
                             "a shadow stage as shadow:10%") from None
        if shadow:
            stages[-1]["shadow"] = True
    if not stages:
        raise UsageError("--stages needs at least one stage")
    if stages[-1].get("shadow"):
        raise UsageError(f"--stages {text!r}: a shadow stage needs a stage after it that makes the release active "
                         "(e.g. shadow:10%,50%,100%)")
    return stages


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``2h`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise UsageError(f"{text!r} is not a duration; give seconds or 30s, 10m, 2h") from None


def parse_rate(text: str) -> float:
    """``10/min`` or ``2/s`` -> devices per minute."""
    number, _, unit = text.partition("/")
    try:
        value = float(number)
        per = {"min": 1.0, "m": 1.0, "s": 60.0, "h": 1 / 60}[unit or "min"]
    except (ValueError, KeyError):
        raise UsageError(f"--rate {text!r}: give devices per minute as N/min") from None
    if not 1 <= value * per <= 1000 * 60:
        raise UsageError("--rate must be between 1/min and 1000/s")
    return value * per


# -- starting and steering -------------------------------------------------------------------------

def _rank(key: str, device: str) -> int:
    """A device's place in the rollout order: stable, and not the alphabet (a stage is a sample)."""
    return int.from_bytes(hashlib.sha256(f"{key}\0{device}".encode()).digest()[:6], "big")


def select_devices(registry, selector: dict) -> list[dict]:
    rows = registry.devices()
    if selector.get("devices"):
        wanted = set(selector["devices"])
        found = [r for r in rows if r["device"] in wanted]
        missing = wanted - {r["device"] for r in found}
        if missing:
            raise UsageError(f"unknown devices: {', '.join(sorted(missing))} (see 'edgepack fleet devices')")
        return found
    if selector.get("group"):
        return [r for r in rows if selector["group"] in device_groups(r)]
    if selector.get("tag"):
        return [r for r in rows if selector["tag"] in (r.get("tags") or [])]
    raise UsageError("say which devices: --group G, --tag T or --devices A,B")


def _models(row: dict) -> dict:
    models = (row.get("state") or {}).get("models")
    return models if isinstance(models, dict) else {}


def start(registry, name: str, version: str, selector: dict, strategy: dict | None = None,
          criteria: dict | None = None) -> int:
    """Create a rollout of release NAME@VERSION to the selected devices; its id. The controller's
    tick does the rest."""
    target = release(registry, name, version)
    if target is None:
        raise UsageError(f"no release {name}@{version}; register it first with 'edgepack fleet release add BUNDLE…'")
    chosen = select_devices(registry, selector)
    if not chosen:
        raise UsageError(f"no device matches {selector}; see 'edgepack fleet devices'")
    strategy = {**DEFAULT_STRATEGY, **{k: v for k, v in (strategy or {}).items() if v is not None}}
    criteria = {**DEFAULT_CRITERIA, **{k: v for k, v in (criteria or {}).items() if v is not None}}
    now = time.time()
    with registry.engine.begin() as db:
        busy = None
        for part in chunked(r["device"] for r in chosen):
            busy = busy or db.execute(select(rollout_devices.c.device, rollouts.c.id)
                                      .join(rollouts, rollouts.c.id == rollout_devices.c.rollout)
                                      .where(rollouts.c.name == name).where(rollouts.c.state.in_(("running", "paused")))
                                      .where(rollout_devices.c.device.in_(part))).first()
        if busy:
            raise UsageError(f"device {busy.device} is in rollout {busy.id} of {name}, still running; "
                             f"abort or finish it first ('edgepack fleet rollout abort {busy.id}')")
        rollout_id = db.execute(rollouts.insert().values(
            kind="rollout", name=name, version=version, selector=selector, strategy=strategy, criteria=criteria,
            state="running", stage=-1, created=now, updated=now, verdicts={})).inserted_primary_key[0]
        members = []
        for row in chosen:
            models = _models(row).get(name) or {}
            status, detail = "pending", None
            if row.get("profile") not in target["bundles"]:
                status, detail = "skipped", f"release has no bundle for profile {row.get('profile')!r}"
            elif models.get("active") == version:
                status, detail = "committed", "already on this version"
            members.append(dict(rollout=rollout_id, device=row["device"], profile=row.get("profile"),
                                rank=_rank(f"{name}@{version}", row["device"]), status=status,
                                from_version=models.get("active"), to_version=version, detail=detail,
                                finished_at=now if status == "committed" else None))
        db.execute(rollout_devices.insert(), members)  # one executemany, not a statement per device
    return rollout_id


def start_rollback(registry, name: str | None, selector: dict | None = None, release_of: tuple | None = None) -> int:
    """A fleet rollback: every selected device (or every device on release ``release_of``) back to
    the version in its other slot, without a download. Its rollout id."""
    rows = select_devices(registry, selector) if selector else registry.devices()
    if release_of:
        name = release_of[0]
        rows = [r for r in rows if (_models(r).get(name) or {}).get("active") == release_of[1]]
    if name is None:
        names = {n for r in rows for n in _models(r)}
        if len(names) != 1:
            raise UsageError(f"the devices run {', '.join(sorted(names)) or 'no model'}; say which with --model")
        name = names.pop()
    plans = []
    for row in rows:
        model = _models(row).get(name) or {}
        previous, active = model.get("previous"), model.get("active")
        if not active:
            continue
        if not previous:
            plans.append((row, None, active, "no previous version on the device"))
            continue
        old = release(registry, name, previous)
        if old is None or row.get("profile") not in old["bundles"]:
            plans.append((row, None, active, f"release {name}@{previous} for profile {row.get('profile')!r} is not "
                                             "registered ('edgepack fleet release add')"))
            continue
        plans.append((row, previous, active, None))
    if not plans:
        raise UsageError("no device to roll back (none of them runs that model)")
    now = time.time()
    with registry.engine.begin() as db:
        rollout_id = db.execute(rollouts.insert().values(
            kind="rollback", name=name, version=release_of[1] if release_of else None,
            selector=selector or {"release": f"{name}@{release_of[1]}"}, criteria={},
            strategy={**DEFAULT_STRATEGY, "stages": [{"percent": 100.0}], "soak_s": 0.0},
            state="running", stage=-1, created=now, updated=now, verdicts={})).inserted_primary_key[0]
        for row, previous, active, problem in plans:
            db.execute(rollout_devices.insert().values(
                rollout=rollout_id, device=row["device"], profile=row.get("profile"), rank=_rank(str(rollout_id), row["device"]),
                status="skipped" if problem else "pending", from_version=active, to_version=previous, detail=problem))
    return rollout_id


#: the state a rollout is in once its pending request is done
_REQUESTED_STATE = {"pause": "paused", "resume": "running", "abort": "aborted"}


def request(registry, rollout_id: int, action: str) -> None:
    """Ask the controller to pause, resume or abort a rollout (done at its next tick).

    A request is judged against the state the rollout will be in once the pending one is done (a
    pause then a resume before the tick cancel out), and an abort is never replaced: a pause sent
    after it, or one the tick is doing while the abort arrives, cannot keep the rollout going. The
    write is conditional on what was read, so a request racing the tick or another CLI is refused
    rather than lost."""
    with registry.engine.begin() as db:
        row = db.execute(select(rollouts).where(rollouts.c.id == rollout_id)).first()
        if row is None:
            raise UsageError(f"no rollout {rollout_id}; see 'edgepack fleet rollouts'")
        pending = row.requested
        effective = _REQUESTED_STATE.get(pending, row.state) if row.state in ("running", "paused") else row.state
        allowed = {"pause": ("running",), "resume": ("paused",), "abort": ("running", "paused")}[action]
        if pending == "abort" or effective not in allowed:
            done = {"pause": "paused", "resume": "resumed", "abort": "aborted"}[action]
            said = " (an abort is requested and wins)" if pending == "abort" else ""
            raise UsageError(f"rollout {rollout_id} is {effective}{said}; it cannot be {done}"
                             + (" (a finished rollout is undone with 'edgepack fleet rollback')" if row.state == "done" else ""))
        # pause+resume (or resume+pause) before the tick: back to no request
        value = None if _REQUESTED_STATE[action] == row.state and action != "abort" else action
        same = rollouts.c.requested.is_(None) if pending is None else rollouts.c.requested == pending
        changed = db.execute(update(rollouts).where(rollouts.c.id == rollout_id).where(rollouts.c.state == row.state)
                             .where(same).values(requested=value, updated=time.time())).rowcount
        if not changed:
            raise UsageError(f"rollout {rollout_id} changed while the request was made; look at "
                             f"'edgepack fleet rollout show {rollout_id}' and try again")


# -- the tick --------------------------------------------------------------------------------------

class LeaseLost(RuntimeError):
    """This controller's lease on the rollouts ran out during a tick (a tick slower than the lease):
    another controller may be advancing them now, so this one stops writing."""


def _hold(controller) -> bool:
    """Take or renew the rollouts lease (at the start of a tick and between its rollouts)."""
    seconds = max(10.0, 5 * controller.tick_s)
    held = take_lease(controller.registry.engine, LEASE, controller.client_id, seconds)
    controller._lease = (LEASE, controller.client_id) if held else None
    return held


#: the lease a controller holds while it advances rollouts
LEASE = "rollouts"


def _fence(controller, db) -> None:
    """Raise LeaseLost unless this controller still holds the lease, inside the transaction of a write
    only the holder may make (a desired state signed and published). Controllers that never took the
    lease (tests driving one rollout) are not fenced."""
    lease = getattr(controller, "_lease", None)
    if lease is not None and not lease_held(db, *lease):
        raise LeaseLost(f"controller {lease[1]} lost the {lease[0]} lease during a tick; another controller goes on")


def tick(controller) -> None:
    """One round over every rollout that is not over (only on the controller holding the lease).

    The lease is renewed between rollouts, and every desired state is signed in a transaction that
    checks it is still held (a fence): a tick that takes longer than the lease — a slow database, a
    paused VM — stops at its next write instead of offering beside the controller that took over."""
    registry = controller.registry
    if not _hold(controller):
        return
    with registry.engine.connect() as db:
        live = db.execute(select(rollouts.c.id).where(
            rollouts.c.state.in_(("running", "paused")) | rollouts.c.id.in_(
                select(rollout_devices.c.rollout).where(rollout_devices.c.status.in_(WAITING)))
            | (rollouts.c.state == "aborted") & rollouts.c.id.in_(  # an abort not finished yet
                select(rollout_devices.c.rollout)
                .where(rollout_devices.c.status.in_(("committed", "timed_out") + shadow_stage.SHADOWED))
                .where(rollout_devices.c.to_version != rollout_devices.c.from_version)))
            .order_by(rollouts.c.id)).scalars().all()
    if not getattr(controller, "_republished", False):
        controller._republished = True
        with registry.engine.connect() as db:  # and the shadow stops of rollouts aborted in the last day
            recent = db.execute(select(rollouts.c.id).where(rollouts.c.state == "aborted")
                                .where(rollouts.c.updated > time.time() - 86400)).scalars().all()
        republish(controller, sorted(set(live) | set(recent)))
    for topic, payload in list(controller.__dict__.get("unpublished", {}).items()):
        _publish(controller, topic, payload)
    for rollout_id in live:
        if not _hold(controller):
            log.warning("rollouts lease lost during a tick; another controller goes on")
            return
        try:
            advance(controller, rollout_id)
        except LeaseLost as exc:
            log.warning("%s", exc)
            return
        except Exception:  # noqa: BLE001 - one rollout (a device's odd state) must not stall the others
            log.exception("rollout %s: tick failed", rollout_id)
    if not _hold(controller):
        return
    now = time.time()
    if now - getattr(controller, "_freshened", 0.0) >= FRESHEN_EVERY_S:
        controller._freshened = now
        try:
            freshen(controller, now)
        except LeaseLost as exc:
            log.warning("%s", exc)


#: how often the controller looks for desired states past half their life
FRESHEN_EVERY_S = 60.0


def freshen(controller, now: float) -> int:
    """Re-sign, with a new version and a new expiry, every device's current desired state that is past
    half its life, while it still says what the fleet wants: the device runs that version, or its
    rollout still waits for it (a device that failed it is not made to try again). Desired states are
    short-lived (a day by default), so this is the fleet's freshness statement (TUF's timestamp role):
    a device whose desired state stops being renewed — a withheld update, a frozen broker — sees it
    expire within a day and reports ``desired_stale``."""
    from .desired import DesiredState, sign_desired

    registry = controller.registry
    latest = select(func.max(desired.c.id)).where(desired.c.topic.like(f"{topics.PREFIX}/devices/%")).group_by(desired.c.topic)
    with registry.engine.connect() as db:
        rows = db.execute(select(desired).where(desired.c.id.in_(latest)).where(desired.c.expires_at.is_not(None))
                          .where(desired.c.expires_at - now < (desired.c.expires_at - desired.c.created) / 2)).all()
    renewed = 0
    for row in rows:
        device = row.topic.split("/")[3]
        with registry.engine.connect() as db:
            state_row = db.execute(select(devices.c.state).where(devices.c.device == device)).first()
            waiting = db.execute(select(rollout_devices.c.status).where(rollout_devices.c.device == device)
                                 .where(rollout_devices.c.desired_version == row.desired_version)
                                 .where(rollout_devices.c.status.in_(WAITING))).first()
            reported = (state_row.state if state_row else None) or {}
            followed = [topics.group_desired(g) for g in reported.get("groups") or [] if isinstance(g, str)]
            # A newer state for this model on a group topic the device follows (a 'fleet push --group'
            # it has not taken yet) is what the fleet wants now: renewing the device's own state
            # with a higher number would out-version it.
            newer = followed and db.execute(
                select(func.max(desired.c.desired_version)).where(desired.c.topic.in_(followed))
                .where(desired.c.model == row.model)
                .where(desired.c.expires_at.is_(None) | (desired.c.expires_at > now))).scalar()
        if newer and newer > row.desired_version:
            continue
        model = (reported.get("models") or {}).get(row.model) or {}
        if model.get("active") != row.version and waiting is None:
            continue
        document = json.loads(json.loads(row.payload)["desired"])
        lifetime = (row.expires_at or now) - (row.created or now)
        with registry.engine.begin() as db:
            number = next_desired_version(db)
            _fence(controller, db)
            state = DesiredState.model_validate({**document, "version": number, "issued_at": now,
                                                 "expires_at": now + max(lifetime, 60.0),
                                                 # agents before 'renews' refuse fields they do not know
                                                 **({"renews": document.get("renews") or row.desired_version}
                                                    if "renews" in (reported.get("accepts") or []) else {})})
            payload = sign_desired(state, controller.signing_key)
            db.execute(desired.insert().values(topic=row.topic, desired_version=number, model=row.model, version=row.version,
                                               rollout=row.rollout, purpose="refresh", payload=payload.decode(),
                                               created=now, expires_at=state.expires_at))
            if waiting is not None:
                db.execute(update(rollout_devices).where(rollout_devices.c.device == device)
                           .where(rollout_devices.c.desired_version == row.desired_version)
                           .values(desired_version=number))
        _publish(controller, row.topic, payload)
        renewed += 1
    return renewed


def republish(controller, rollout_ids) -> None:
    """After a restart: publish again the (identical, already signed) desired state of every device
    still waiting (or told to stop a shadow), in case the controller died between recording and
    publishing it. A device takes
    the retained copy of a desired state it accepted already as a no-op."""
    registry = controller.registry
    with registry.engine.connect() as db:
        waiting = db.execute(select(rollout_devices.c.device, desired.c.topic, desired.c.payload).select_from(desired)
                             .join(rollout_devices, (rollout_devices.c.desired_version == desired.c.desired_version))
                             .where(rollout_devices.c.rollout.in_(list(rollout_ids)))
                             .where(rollout_devices.c.status.in_(WAITING + (shadow_stage.ENDED,)))).all()
    for row in waiting:
        if row.topic == topics.desired(row.device):
            _publish(controller, row.topic, row.payload.encode())


def advance(controller, rollout_id: int) -> None:
    registry = controller.registry
    now = time.time()
    with registry.engine.connect() as db:
        rollout = dict(db.execute(select(rollouts).where(rollouts.c.id == rollout_id)).first()._mapping)
    action = rollout["requested"]
    if action:
        if not _apply_request(registry, rollout, now):
            return
        if action == "abort":
            finish_abort(controller, rollout)
        return
    refresh(controller, rollout, now)
    if rollout["state"] == "aborted":
        finish_abort(controller, rollout)  # every tick: an abort cut short (a kill, an error) is completed
        return
    if rollout["state"] != "running":
        return
    members = _members(registry, rollout_id)
    problem = failure_verdict(rollout, members)
    verdicts = dict(rollout.get("verdicts") or {})
    if problem:
        verdicts["failures"] = problem
        _save(registry, rollout_id, verdicts=verdicts)
        if problem["decision"] == "abort":
            abort(controller, rollout, problem["message"])
            return
    if rollout["kind"] == "rollout" and any(k in rollout["criteria"] for k in METRIC_LIMITS):
        metrics = metric_verdict(registry, rollout, members, now)
        verdicts["metrics"] = metrics
        _save(registry, rollout_id, verdicts=verdicts)
        if metrics["decision"] == "abort":
            abort(controller, rollout, metrics["message"])
            return
    else:
        metrics = {"decision": "pass"}
    offer_next(controller, rollout, members, metrics, now)


def _apply_request(registry, rollout: dict, now: float) -> bool:
    """Do the rollout's pending request in one conditional write; False when another request replaced
    it meanwhile (the next tick does that one). An abort is saved as the state at once, so a crash
    before its rollbacks are offered still leaves an aborted rollout (finished at the next tick); a
    request to a rollout that is over already (aborted by its criteria meanwhile) is dropped."""
    action = rollout["requested"]
    if rollout["state"] not in ("running", "paused"):
        values = {"requested": None, "updated": now}
    else:
        values = {"requested": None, "state": _REQUESTED_STATE[action], "updated": now}
        if action == "resume":
            values["stage_started"] = now  # the soak of the stage under way starts again
        if action == "abort":
            values["reason"] = "aborted by the operator"
    with registry.engine.begin() as db:
        done = db.execute(update(rollouts).where(rollouts.c.id == rollout["id"]).where(rollouts.c.requested == action)
                          .where(rollouts.c.state == rollout["state"]).values(**values)).rowcount
    if done:
        rollout.update(values)
    return bool(done) and "state" in values


def _save(registry, rollout_id: int, **values) -> None:
    with registry.engine.begin() as db:
        db.execute(update(rollouts).where(rollouts.c.id == rollout_id).values(**{"updated": time.time(), **values}))


def _members(registry, rollout_id: int) -> list[dict]:
    with registry.engine.connect() as db:
        return [dict(r._mapping) for r in db.execute(select(rollout_devices).where(rollout_devices.c.rollout == rollout_id)
                                                     .order_by(rollout_devices.c.rank))]


def refresh(controller, rollout: dict, now: float) -> None:
    """Move each waiting device on by what it reports."""
    registry = controller.registry
    timeout = float(rollout["strategy"].get("device_timeout_s") or 1800.0)
    with registry.engine.connect() as db:
        waiting = db.execute(select(rollout_devices, devices.c.state, devices.c.online)
                             .join(devices, devices.c.device == rollout_devices.c.device)
                             .where(rollout_devices.c.rollout == rollout["id"])
                             .where(rollout_devices.c.status.in_(WAITING))).all()
    changes = []
    for row in waiting:
        model = ((row.state or {}).get("models") or {}).get(rollout["name"]) or {}
        update_state = model.get("update") or {}
        values = {}
        if row.online and row.seen_at is None:
            values["seen_at"] = now
        idle = update_state.get("state") == "idle"
        if row.status == shadow_stage.OFFERED:
            values.update(shadow_stage.refresh(row.state, row._mapping, rollout["name"], now))
            if not values.get("status") and (row.seen_at or values.get("seen_at")) and now - (row.seen_at or now) > timeout:
                values.update(status=shadow_stage.FAILED, finished_at=now,
                              detail=f"no shadow running within {timeout:g} s of the device coming online")
        elif model.get("active") == row.to_version and idle:
            values.update(status="committed" if row.status == "offered" else "rolled_back", finished_at=now,
                          detail=None)
        elif (row.status == "offered" and idle and model.get("target") == row.to_version
              and update_state.get("result") in ("failed", "rolled_back")
              and _answers(model, update_state, row, _offer_floor(registry, row.desired_version))):
            values.update(status="failed", finished_at=now, detail=update_state.get("reason"))
        elif row.status == "offered" and (row.seen_at or values.get("seen_at")) and now - (row.seen_at or now) > timeout:
            values.update(status="timed_out", finished_at=now,
                          detail=f"no result within {timeout:g} s of the device coming online")
        elif update_state.get("state") not in (None, "idle") and model.get("target") == row.to_version:
            values["detail"] = update_state.get("state")  # downloading, probation…: shown by 'rollout show'
        if values:
            changes.append((row.device, row.status, values))
    if changes:
        with registry.engine.begin() as db:
            for device, status, values in changes:
                db.execute(update(rollout_devices).where(rollout_devices.c.rollout == rollout["id"])
                           .where(rollout_devices.c.device == device).where(rollout_devices.c.status == status)
                           .values(**values))
    retries = int(rollout["strategy"].get("retries") or 0)
    if retries and rollout["state"] == "running":
        for device, status, values in changes:
            if values.get("status") == "failed":
                _retry(controller, rollout, device, retries)


def _answers(model: dict, update_state: dict, row, floor: int | None = None) -> bool:
    """Whether the failure a device reports is the result of this offer, not of an earlier one: by the
    desired-state version the device names (agents report it; ``floor``, the first version of a
    renewed offer, counts as this offer too), else by time."""
    reported = model.get("desired_version")
    if isinstance(reported, int) and not isinstance(reported, bool):
        return reported >= min(floor or row.desired_version or 0, row.desired_version or 0)
    since = update_state.get("since")
    return isinstance(since, (int, float)) and since >= (row.offered_at or 0)


def _offer_floor(registry, desired_version: int | None) -> int | None:
    """The first desired-state version of the offer ``desired_version`` renews (itself when it renews
    none): a failure the device reports against the offer before a renewal still answers it."""
    if not desired_version:
        return None
    with registry.engine.connect() as db:
        payload = db.execute(select(desired.c.payload).where(desired.c.desired_version == desired_version)).scalar()
    try:
        return int(json.loads(json.loads(payload)["desired"]).get("renews") or desired_version)
    except (TypeError, ValueError, KeyError):
        return desired_version


def _retry(controller, rollout: dict, device: str, retries: int) -> None:
    registry = controller.registry
    with registry.engine.connect() as db:
        offers = db.execute(select(func.count()).select_from(desired).where(desired.c.rollout == rollout["id"])
                            .where(desired.c.purpose == "offer")
                            .where(desired.c.topic == topics.desired(device))).scalar_one()
        member = db.execute(select(rollout_devices).where(rollout_devices.c.rollout == rollout["id"])
                            .where(rollout_devices.c.device == device)).first()
    if offers <= retries:
        offer(controller, rollout, dict(member._mapping), rollout["version"], "offer", from_status="failed")


def failure_verdict(rollout: dict, members: list[dict]) -> dict | None:
    """Install failures against the abort criterion (AWS IoT Jobs' semantics: a percentage of the
    finished devices, judged once a minimum number has finished)."""
    if rollout["kind"] != "rollout":
        return None
    criteria = rollout["criteria"]
    counted = [m for m in members if m["status"] in FINISHED and m["detail"] != "already on this version"]
    failed = sum(m["status"] in ("failed", "timed_out") for m in counted)
    finished = len(counted)
    if not finished:
        return None
    share = 100.0 * failed / finished
    limit, minimum = criteria.get("max_failure_pct"), int(criteria.get("min_finished") or 1)
    verdict = {"finished": finished, "failed": failed, "failure_pct": round(share, 2), "limit_pct": limit,
               "min_finished": minimum, "decision": "pass"}
    if limit is not None and finished >= minimum and share >= limit:
        verdict["decision"] = "abort"
        verdict["message"] = (f"{failed} of {finished} finished devices failed ({share:.1f}% >= {limit:g}% after "
                              f">= {minimum} finished)")
    return verdict


# -- model metrics: the new cohort against the old -------------------------------------------------

def _cohort(registry, model: str, devices_, versions: list[str], since_minute: int) -> dict:
    """Summed rollups of ``model`` at ``versions`` on ``devices_`` (a SELECT of device ids: a fleet's
    cohort can pass PostgreSQL's 65,535 bound parameters as a literal list)."""
    if not versions:
        return {"devices": 0, "requests": 0, "errors": 0, "error_rate": None, "p95_s": None, "drift_share": None,
                "classes": {}}
    with registry.engine.connect() as db:
        row = db.execute(select(func.count(func.distinct(rollups.c.device)), func.sum(rollups.c.requests),
                                func.sum(rollups.c.errors), func.sum(rollups.c.p95_weighted), func.sum(rollups.c.p95_requests),
                                func.sum(rollups.c.drift_messages), func.sum(rollups.c.drifted_messages))
                         .where(rollups.c.model == model).where(rollups.c.device.in_(devices_))
                         .where(rollups.c.version.in_(versions)).where(rollups.c.minute >= since_minute)).first()
        classes = dict(db.execute(rollout_classes_query(model, devices_, versions, since_minute)).all())
    count, requests, errors, weighted, timed, drift_n, drifted = row
    requests = int(requests or 0)
    return {"devices": int(count or 0), "requests": requests, "errors": int(errors or 0),
            "error_rate": (errors or 0) / requests if requests else None,
            "p95_s": weighted / timed if timed else None,
            "drift_share": (drifted or 0) / drift_n if drift_n else None,
            "classes": {str(k): int(v) for k, v in classes.items()}}


def psi(new: dict, old: dict, floor: float = 1e-4) -> float | None:
    """Population stability index of two class-count distributions."""
    labels = set(new) | set(old)
    total_new, total_old = sum(new.values()), sum(old.values())
    if not labels or not total_new or not total_old:
        return None
    value = 0.0
    for label in labels:
        p = max(new.get(label, 0) / total_new, floor)
        q = max(old.get(label, 0) / total_old, floor)
        value += (p - q) * math.log(p / q)
    return value


def metric_verdict(registry, rollout: dict, members: list[dict], now: float) -> dict:
    """Per profile: the updated devices (committed in this rollout) against the devices of the rollout
    still on the version they came from, over the last ``window_s``."""
    criteria = rollout["criteria"]
    since = int((now - float(criteria.get("window_s") or 600)) // 60)
    minimum = int(criteria.get("min_requests") or 100)
    profiles: dict[str, dict] = {}
    for profile in sorted({m["profile"] for m in members if m["profile"]}):
        mine = [m for m in members if m["profile"] == profile]
        if not any(m["status"] == "committed" for m in mine):
            continue  # nothing of this profile updated yet: nothing to judge
        old_versions = sorted({m["from_version"] for m in mine if m["from_version"] and m["from_version"] != rollout["version"]})
        everyone = (select(rollout_devices.c.device).where(rollout_devices.c.rollout == rollout["id"])
                    .where(rollout_devices.c.profile == profile))
        new = everyone.where(rollout_devices.c.status == "committed")
        cohort_new = _cohort(registry, rollout["name"], new, [rollout["version"]], since)
        cohort_old = _cohort(registry, rollout["name"], everyone, old_versions, since)
        verdict = {"new": {k: v for k, v in cohort_new.items() if k != "classes"},
                   "old": {k: v for k, v in cohort_old.items() if k != "classes"}}
        if cohort_new["requests"] < minimum or cohort_old["requests"] < minimum:
            verdict["decision"] = "waiting"
            verdict["message"] = (f"{cohort_new['requests']} requests on the new version, {cohort_old['requests']} on the "
                                  f"old; {minimum} of each are needed")
            profiles[profile] = verdict
            continue
        measured = {
            "latency_ratio": (cohort_new["p95_s"] / cohort_old["p95_s"]
                              if cohort_new["p95_s"] and cohort_old["p95_s"] else None),
            "error_delta": (cohort_new["error_rate"] - cohort_old["error_rate"]),
            "drift_delta": (cohort_new["drift_share"] - cohort_old["drift_share"]
                            if cohort_new["drift_share"] is not None and cohort_old["drift_share"] is not None else None),
            "prediction_psi": psi(cohort_new["classes"], cohort_old["classes"]),
        }
        verdict.update({k: (round(v, 4) if v is not None else None) for k, v in measured.items()})
        broken = [f"{field} {measured[field]:.3g} > {criteria[limit]:g}" for limit, field in METRIC_LIMITS.items()
                  if criteria.get(limit) is not None and measured[field] is not None and measured[field] > criteria[limit]]
        verdict["decision"] = "abort" if broken else "pass"
        if broken:
            verdict["message"] = f"{profile}: " + ", ".join(broken) + " (new cohort vs old, same window)"
        profiles[profile] = verdict
    decisions = {v["decision"] for v in profiles.values()}
    decision = "abort" if "abort" in decisions else "waiting" if "waiting" in decisions or not profiles else "pass"
    result = {"decision": decision, "profiles": profiles, "window_s": criteria.get("window_s"), "at": now}
    if decision == "abort":
        result["message"] = "; ".join(v["message"] for v in profiles.values() if v["decision"] == "abort")
    return result


# -- offering --------------------------------------------------------------------------------------

def _stage_sizes(strategy: dict, total: int) -> list[int]:
    sizes = []
    minimum = int(strategy.get("min_devices") or 1)
    for stage in strategy["stages"]:
        size = stage["count"] if "count" in stage else math.ceil(stage["percent"] / 100.0 * total)
        sizes.append(min(total, max(size, minimum, sizes[-1] if sizes else 0)))
    return sizes


def _rate_allowed(strategy: dict, started: float, now: float) -> int:
    """Offers allowed by ``now``: ``rate_per_min`` devices a minute, multiplied by ``growth`` after every minute."""
    rate, growth = float(strategy["rate_per_min"]), float(strategy.get("growth") or 1.0)
    minutes = max(0.0, (now - started) / 60.0)
    whole = int(minutes)
    done = rate * (whole if growth == 1 else (growth ** whole - 1) / (growth - 1))
    return max(1, int(done + rate * growth ** whole * (minutes - whole)))


def offer_next(controller, rollout: dict, members: list[dict], metrics: dict, now: float) -> None:
    strategy = rollout["strategy"]
    eligible = [m for m in members if m["status"] != "skipped"]
    if rollout["stage"] < 0:
        _save(controller.registry, rollout["id"], stage=0, stage_started=now)
        rollout.update(stage=0, stage_started=now)
    if "rate_per_min" in strategy:
        limit = _rate_allowed(strategy, rollout["stage_started"], now)
        offered = sum(m["status"] != "pending" for m in eligible)
        if offered < limit:
            for member in [m for m in eligible if m["status"] == "pending"][: limit - offered]:
                offer(controller, rollout, member, member["to_version"], "offer")
        elif all(m["status"] != "pending" for m in eligible) and _settled(eligible):
            _save(controller.registry, rollout["id"], state="done")
        return
    sizes = _stage_sizes(strategy, len(eligible))
    stage = rollout["stage"]
    current = eligible[: sizes[stage]]
    if shadow_stage.is_shadow(strategy, stage):
        _shadow_stage(controller, rollout, current, now)
        return
    pending = [m for m in current if m["status"] in ("pending", shadow_stage.PASSED)]
    for member in pending:
        offer(controller, rollout, member, member["to_version"], "offer", from_status=member["status"])
    if pending:
        return
    soaked = now - (rollout["stage_started"] or now) >= float(strategy.get("soak_s") or 0)
    if not (_settled(current) and soaked):
        return
    if rollout["kind"] == "rollout":
        # hawkBit's success threshold: a stage whose devices mostly failed does not lead to a bigger one,
        # even when it is too small for the failure criterion's minimum.
        finished = [m for m in current if m["status"] in FINISHED]
        succeeded = sum(m["status"] == "committed" for m in finished)
        needed = float(rollout["criteria"].get("min_success_pct", 100.0 - float(rollout["criteria"].get("max_failure_pct") or 0)))
        if finished and 100.0 * succeeded / len(finished) < needed:
            abort(controller, rollout, f"stage {stage + 1}: {succeeded} of {len(finished)} finished devices committed "
                                       f"({100.0 * succeeded / len(finished):.0f}% < {needed:g}%)")
            return
    waited = now - (rollout["stage_started"] or now)
    if metrics["decision"] == "waiting" and waited < 3 * max(float(strategy.get("soak_s") or 0), 60.0):
        return  # the metric gate has too little traffic to judge yet
    if stage + 1 < len(sizes):
        _save(controller.registry, rollout["id"], stage=stage + 1, stage_started=now)
    else:
        _save(controller.registry, rollout["id"], state="done")


def _shadow_stage(controller, rollout: dict, current: list[dict], now: float) -> None:
    """Offer the stage's devices the release in shadow; after the soak, judge the agreement they
    report: promote (the next stage makes it active, on these devices first) or abort with the numbers."""
    registry, strategy, name = controller.registry, rollout["strategy"], rollout["name"]
    for member in [m for m in current if m["status"] == "pending"]:
        problem = shadow_stage.can_shadow(registry.device(member["device"]), member)
        if problem is None:
            old = release(registry, name, member["from_version"])
            if old is None or member["profile"] not in old["bundles"]:
                problem = (f"release {name}@{member['from_version']} for profile {member['profile']!r} is not registered "
                           "('edgepack fleet release add')")
        if problem:
            if member["detail"] != f"not in shadow: {problem}":
                _mark(registry, rollout["id"], member["device"], "pending", detail=f"not in shadow: {problem}")
            continue
        offer(controller, rollout, member, member["from_version"], "shadow")
    ids = {m["device"] for m in current}
    stage_members = [m for m in _members(registry, rollout["id"]) if m["device"] in ids]
    mine = [m for m in stage_members if m["status"] in shadow_stage.ACTIVE_STATUSES]
    if not mine:
        if not any(m["status"] == "pending" for m in stage_members):
            # every device of the stage is on the release already (a second rollout of it): nothing to judge
            _save(registry, rollout["id"], stage=rollout["stage"] + 1, stage_started=now)
            return
        reasons = sorted({m["detail"] for m in stage_members if m["detail"]})
        abort(controller, rollout, f"shadow stage {rollout['stage'] + 1}: no device of the stage can run the release "
                                   f"in shadow ({'; '.join(reasons)[:300] or 'none pending'})")
        return
    waited = now - (rollout["stage_started"] or now)
    if waited < float(strategy.get("soak_s") or 0) or not _settled(mine):
        return
    result = shadow_stage.verdict(registry, rollout, mine, now)
    with registry.engine.connect() as db:
        verdicts = dict(db.execute(select(rollouts.c.verdicts).where(rollouts.c.id == rollout["id"])).scalar() or {})
    verdicts["shadow"] = result
    _save(registry, rollout["id"], verdicts=verdicts)
    if result["decision"] == "waiting":
        if waited < 3 * max(float(strategy.get("soak_s") or 0), 60.0):
            return
        result = dict(result, decision="abort", message=f"shadow stage {rollout['stage'] + 1}: {result['message']} "
                                                        f"after {waited:.0f} s")
    if result["decision"] == "abort":
        abort(controller, rollout, result["message"])
        return
    # Promoted, in one transaction (a crash leaves the stage either judged or not): the next stage
    # offers these devices the release first.
    with registry.engine.begin() as db:
        db.execute(update(rollout_devices).where(rollout_devices.c.rollout == rollout["id"])
                   .where(rollout_devices.c.status.in_(shadow_stage.ACTIVE_STATUSES))
                   .values(status=shadow_stage.PASSED, finished_at=None, detail="promoted from shadow"))
        db.execute(update(rollouts).where(rollouts.c.id == rollout["id"])
                   .values(stage=rollout["stage"] + 1, stage_started=now, updated=time.time()))
    log.info("rollout %s: shadow stage %d passed (agreement %s over %d samples); promoted", rollout["id"],
             rollout["stage"] + 1, result["agreement"], result["samples"])


def _settled(members: list[dict]) -> bool:
    """Every device of the stage that came online since its offer has a result (one that stayed
    offline does not hold the stage up: its retained desired state waits for it)."""
    return all(m["status"] not in WAITING or m["seen_at"] is None for m in members)


def abort(controller, rollout: dict, reason: str) -> None:
    """Stop offering; send every device that took (or may be taking) the release back to its version.
    The state is saved first, and :func:`finish_abort` runs again at every tick, so an abort cut short
    by a crash is completed by whichever controller ticks next."""
    registry = controller.registry
    _save(registry, rollout["id"], state="aborted", reason=reason)
    rollout.update(state="aborted", reason=reason)
    finish_abort(controller, rollout)


def finish_abort(controller, rollout: dict) -> None:
    if rollout["kind"] != "rollout":
        return  # a fleet rollback that is aborted just stops: offering the newer version again would undo it
    registry = controller.registry
    for member in _members(registry, rollout["id"]):
        if member["status"] in shadow_stage.SHADOWED:
            try:  # a desired state without the shadow: the device stops it and keeps its version
                offer(controller, rollout, member, member["from_version"], "unshadow", from_status=member["status"])
            except LeaseLost:
                raise
            except Exception:  # noqa: BLE001 - as below
                log.exception("shadow stop offer to %s failed", member["device"])
            continue
        if member["status"] not in ("offered", "committed", "timed_out") or member["to_version"] == member["from_version"]:
            continue
        if not member["from_version"]:
            if member["detail"] != "no version to go back to":
                _mark(registry, rollout["id"], member["device"], member["status"], detail="no version to go back to")
            continue
        try:
            offer(controller, rollout, member, member["from_version"], "rollback", from_status=member["status"])
        except LeaseLost:
            raise
        except Exception:  # noqa: BLE001 - one device must not cost the others their rollback; next tick again
            log.exception("rollback offer to %s failed", member["device"])


def _mark(registry, rollout_id: int, device: str, status: str, **values) -> None:
    with registry.engine.begin() as db:
        db.execute(update(rollout_devices).where(rollout_devices.c.rollout == rollout_id)
                   .where(rollout_devices.c.device == device).where(rollout_devices.c.status == status).values(**values))


def next_desired_version(db, reserve: bool = True) -> int:
    """One more than any desired-state version the fleet signed: devices compare versions per model
    across topics, so one counter for the whole fleet keeps every new state newer.

    With ``reserve`` (call it first in the transaction that records the new state) it serialises the
    signers until that transaction ends — PostgreSQL: a transaction advisory lock; SQLite: the write
    lock, taken before the read — so two controllers, or ``fleet push`` beside one, never sign the same
    number (the unique index on ``desired_version`` is the backstop)."""
    if reserve:
        if db.dialect.name == "postgresql":
            db.execute(text("SELECT pg_advisory_xact_lock(7340031)"))
        else:
            db.execute(text("UPDATE leases SET until = until WHERE 0 = 1"))  # BEGIN's write lock, now
    return int(db.execute(select(func.max(desired.c.desired_version))).scalar() or 0) + 1


def offer(controller, rollout: dict, member: dict, version: str, purpose: str, from_status: str = "pending") -> bool:
    """Sign a desired state for one device (its profile's bundle of NAME@``version``), record it and
    the device's new status in one transaction, then publish it retained."""
    from .desired import BundleRef, DesiredState, ModelRef, ProbationBudget, sign_desired

    from .desired import ShadowRef

    registry = controller.registry
    target = release(registry, rollout["name"], version)
    ref = (target or {}).get("bundles", {}).get(member["profile"])
    # a shadow offer names the version the device runs, and the release as its shadow
    candidate = release(registry, rollout["name"], rollout["version"]) if purpose == "shadow" else None
    shadow_ref = (candidate or {}).get("bundles", {}).get(member["profile"]) if purpose == "shadow" else None
    if ref is None or (purpose == "shadow" and shadow_ref is None):
        _mark(registry, rollout["id"], member["device"], from_status, status="skipped",
              detail=f"no release {rollout['name']}@{version if ref is None else rollout['version']} "
                     f"for profile {member['profile']!r}")
        return False
    if getattr(controller, "bundle_url", None):
        # an HTTP(S) source (the shelf's content-addressed name under it); MQTT chunks stay the fallback
        ref = dict(ref, url=f"{controller.bundle_url}{ref['sha256']}.edgepack")
        if shadow_ref is not None:
            shadow_ref = dict(shadow_ref, url=f"{controller.bundle_url}{shadow_ref['sha256']}.edgepack")
    criteria, strategy = rollout["criteria"], rollout["strategy"]
    budget = {"duration_s": criteria.get("probation_s"), "max_latency_ratio": criteria.get("max_latency_ratio"),
              "max_error_rate": criteria.get("max_device_error_rate"), "max_p95_ms": criteria.get("max_p95_ms"),
              "min_runs": criteria.get("min_runs")} if purpose == "offer" else {}
    budget = {k: v for k, v in budget.items() if v is not None}
    now = time.time()
    device = member["device"]
    with registry.engine.begin() as db:
        number = next_desired_version(db)
        _fence(controller, db)
        state = DesiredState(version=number, device=device, issued_at=now,
                             expires_at=now + float(strategy.get("expires_s") or 7 * 86400),
                             model=ModelRef(name=rollout["name"], version=version),
                             bundles={member["profile"]: BundleRef(**ref)},
                             probation=ProbationBudget(**budget) if budget else None,
                             shadow=ShadowRef(version=rollout["version"], bundles={member["profile"]: BundleRef(**shadow_ref)},
                                              sample_rate=strategy.get("shadow_sample_rate"))
                             if shadow_ref is not None else None)
        payload = sign_desired(state, controller.signing_key)
        db.execute(desired.insert().values(topic=topics.desired(device), desired_version=number, model=rollout["name"],
                                           version=version, rollout=rollout["id"], purpose=purpose,
                                           payload=payload.decode(), created=now, expires_at=state.expires_at))
        status = "offered" if purpose == "offer" else "rollback_offered"
        if purpose == "shadow":
            values = {"status": shadow_stage.OFFERED, "desired_version": number, "offered_at": now, "seen_at": None,
                      "finished_at": None, "stage": rollout["stage"], "detail": None}
        elif purpose == "unshadow":
            values = {"status": shadow_stage.ENDED, "desired_version": number, "finished_at": now,
                      "detail": "shadow stopped: the rollout was aborted"}
        elif purpose == "rollback" and rollout["kind"] == "rollout":
            values = {"status": status, "desired_version": number, "to_version": version, "offered_at": now,
                      "seen_at": None, "finished_at": None}
        else:
            # a retry goes to a device that just answered: it is online, so its stage waits for it
            values = {"status": status, "desired_version": number, "offered_at": now,
                      "seen_at": now if from_status == "failed" else None, "finished_at": None, "stage": rollout["stage"]}
        if rollout["kind"] == "rollback":
            values["status"] = "offered"
        changed = db.execute(update(rollout_devices).where(rollout_devices.c.rollout == rollout["id"])
                             .where(rollout_devices.c.device == device).where(rollout_devices.c.status == from_status)
                             .values(**values)).rowcount
        if not changed:
            raise RuntimeError(f"device {device} moved on in rollout {rollout['id']} meanwhile")
    _publish(controller, topics.desired(device), payload)
    return True


def _publish(controller, topic: str, payload: bytes) -> None:
    """Publish a recorded desired state; one the broker did not take is tried again at the next ticks."""
    pending = controller.__dict__.setdefault("unpublished", {})
    if controller.publish_desired(topic, payload):
        pending.pop(topic, None)
    else:
        pending[topic] = payload


# -- looking ---------------------------------------------------------------------------------------

def summary(registry, rollout_id: int | None = None) -> list[dict]:
    """Rollouts with their counts per stage and status, and their verdicts."""
    query = select(rollouts).order_by(rollouts.c.id)
    if rollout_id is not None:
        query = query.where(rollouts.c.id == rollout_id)
    with registry.engine.connect() as db:
        heads = [dict(r._mapping) for r in db.execute(query)]
    if rollout_id is not None and not heads:
        raise UsageError(f"no rollout {rollout_id}; see 'edgepack fleet rollouts'")
    result = []
    for head in heads:
        members = _members(registry, head["id"])
        counts: dict[str, int] = {}
        stages: dict[str, dict[str, int]] = {}
        for m in members:
            status = m["status"]
            if status == "offered" and m["detail"] in ("downloading", "staging", "switching", "probation"):
                status = m["detail"]
            counts[status] = counts.get(status, 0) + 1
            key = str(m["stage"]) if m["stage"] is not None else "-"
            stages.setdefault(key, {})
            stages[key][status] = stages[key].get(status, 0) + 1
        head.update(devices=len(members), counts=counts, stages=stages)
        if rollout_id is not None:
            head["members"] = members
        result.append(head)
    return result
