"""What the dashboard shows, read from the fleet registry: devices (filtered), rollouts with their
progress per stage, and per-release time series (p95 latency, error rate, drift, shadow agreement)
aligned on one minute axis, the shape uPlot draws without reshaping in the browser."""

from __future__ import annotations

import time

from sqlalchemy import func, select

from ..db import rollout_devices, rollouts, rollup_shadow, rollups
from ..registry import device_groups

#: an offered device's detail that says how far it got (what 'rollout show' shows too)
IN_FLIGHT_DETAILS = ("downloading", "staging", "switching", "probation")

#: device filters the page and ``/api/devices`` take
FILTERS = ("group", "tag", "profile", "state", "version", "online")


def _text(value) -> str | None:
    """A string a device reported, or None (states are stored as the devices sent them)."""
    return value[:128] if isinstance(value, str) else None


def device_view(row: dict) -> dict:
    """One device as the table shows it: its models' active/previous versions and update state. Only
    strings are taken from what the device reported, so one odd state cannot break the page."""
    state = row.get("state") if isinstance(row.get("state"), dict) else {}
    reported = state.get("models") if isinstance(state.get("models"), dict) else {}
    models = {}
    for name, model in list(reported.items())[:32]:
        if not isinstance(model, dict):
            continue
        update = model.get("update") if isinstance(model.get("update"), dict) else {}
        shadow = model.get("shadow") if isinstance(model.get("shadow"), dict) else {}
        models[str(name)[:128]] = {"active": _text(model.get("active")), "previous": _text(model.get("previous")),
                                   "state": _text(update.get("state")), "step": _text(update.get("step")),
                                   "shadow": _text(shadow.get("version"))}
    groups = sorted(g for g in device_groups(row) if isinstance(g, str))
    tags = sorted(t for t in (row.get("tags") or []) if isinstance(t, str))
    return {"device": row["device"], "online": bool(row.get("online")), "profile": _text(row.get("profile")),
            "groups": groups, "tags": tags, "models": models, "last_seen": row.get("last_seen")}


def matches(view: dict, filters: dict) -> bool:
    """Whether a device view passes every given filter (empty values are no filter)."""
    if filters.get("group") and filters["group"] not in view["groups"]:
        return False
    if filters.get("tag") and filters["tag"] not in view["tags"]:
        return False
    if filters.get("profile") and filters["profile"] != view["profile"]:
        return False
    online = filters.get("online")
    if online in ("online", "offline") and view["online"] != (online == "online"):
        return False
    if filters.get("state") and not any(m["state"] == filters["state"] for m in view["models"].values()):
        return False
    if filters.get("version") and not any(filters["version"] in (m["active"], f"{n}@{m['active']}")
                                          for n, m in view["models"].items()):
        return False
    return True


def devices_view(registry, filters: dict | None = None) -> dict:
    """Devices passing ``filters``, the counts, and the values each filter can take."""
    views = [device_view(row) for row in registry.devices()]
    shown = [v for v in views if matches(v, filters or {})]
    choices = {
        "group": sorted({g for v in views for g in v["groups"]}),
        "tag": sorted({t for v in views for t in v["tags"]}),
        "profile": sorted({v["profile"] for v in views if v["profile"]}),
        "state": sorted({m["state"] for v in views for m in v["models"].values() if m["state"]}),
        "version": sorted({f"{n}@{m['active']}" for v in views for n, m in v["models"].items() if m["active"]}),
    }
    return {"total": len(views), "online": sum(v["online"] for v in views), "shown": len(shown),
            "devices": shown, "choices": choices}


def rollouts_view(registry, limit: int = 20) -> list[dict]:
    """The latest rollouts (newest first) with counts per stage and status and their verdicts: the
    heads with LIMIT and the counts grouped in SQL (a fleet's history is not read every second)."""
    with registry.engine.connect() as db:
        heads = [dict(r._mapping) for r in db.execute(select(rollouts).order_by(rollouts.c.id.desc()).limit(limit))]
        ids = [h["id"] for h in heads]
        grouped = db.execute(
            select(rollout_devices.c.rollout, rollout_devices.c.stage, rollout_devices.c.status,
                   rollout_devices.c.detail, func.count())
            .where(rollout_devices.c.rollout.in_(ids))
            .group_by(rollout_devices.c.rollout, rollout_devices.c.stage, rollout_devices.c.status,
                      rollout_devices.c.detail)).all() if ids else []
    counts: dict[int, dict] = {i: {} for i in ids}
    stages: dict[int, dict] = {i: {} for i in ids}
    for rollout_id, stage, status, detail, count in grouped:
        if status == "offered" and detail in IN_FLIGHT_DETAILS:
            status = detail
        counts[rollout_id][status] = counts[rollout_id].get(status, 0) + count
        key = str(stage) if stage is not None else "-"
        per = stages[rollout_id].setdefault(key, {})
        per[status] = per.get(status, 0) + count
    out = []
    for row in heads:
        strategy = row.get("strategy") or {}
        planned = strategy.get("stages") or []
        out.append({"id": row["id"], "kind": row["kind"],
                    "release": f"{row['name']}@{row['version']}" if row.get("version") else row["name"],
                    "state": row["state"], "stage": row["stage"], "requested": row.get("requested"),
                    "stages": [f"{s['percent']:g}%" if "percent" in s else f"{s.get('count')} devices" for s in planned],
                    "shadow_stages": [i for i, s in enumerate(planned) if s.get("shadow")],
                    "devices": sum(counts[row["id"]].values()), "counts": counts[row["id"]],
                    "per_stage": stages[row["id"]], "reason": row.get("reason"), "verdicts": row.get("verdicts") or {},
                    "created": row.get("created"), "updated": row.get("updated")})
    return out


def _aligned(points: dict[str, dict[int, float]], minutes: list[int]) -> list[list]:
    return [[points[key].get(m) for m in minutes] for key in sorted(points)]


def series_view(registry, window_s: float = 3600.0, now: float | None = None) -> dict:
    """Per release (``model@version``), per minute over the last ``window_s``: request-weighted p95
    latency (ms), error rate, the share of drift reports that said drifted, and shadow agreement
    (samples-weighted, of the release as a shadow candidate). ``x`` is Unix seconds."""
    now = time.time() if now is None else now
    since = int((now - window_s) // 60)
    p95, errors, drift, agreement = {}, {}, {}, {}
    minutes: set[int] = set()
    with registry.engine.connect() as db:
        rows = db.execute(
            select(rollups.c.model, rollups.c.version, rollups.c.minute, func.sum(rollups.c.requests),
                   func.sum(rollups.c.errors), func.sum(rollups.c.p95_weighted), func.sum(rollups.c.p95_requests),
                   func.sum(rollups.c.drift_messages), func.sum(rollups.c.drifted_messages))
            .where(rollups.c.minute >= since)
            .group_by(rollups.c.model, rollups.c.version, rollups.c.minute)).all()
        shadow_rows = db.execute(
            select(rollup_shadow.c.model, rollup_shadow.c.version, rollup_shadow.c.minute,
                   func.sum(rollup_shadow.c.agreement * rollup_shadow.c.samples), func.sum(rollup_shadow.c.samples))
            .where(rollup_shadow.c.minute >= since).where(rollup_shadow.c.agreement.is_not(None))
            .group_by(rollup_shadow.c.model, rollup_shadow.c.version, rollup_shadow.c.minute)).all()
    # PostgreSQL sums integers to NUMERIC (Decimal): floats before any arithmetic
    rows = [tuple(r[:3]) + tuple(float(v or 0) for v in r[3:]) for r in rows]
    shadow_rows = [tuple(r[:3]) + tuple(float(v or 0) for v in r[3:]) for r in shadow_rows]
    for model, version, minute, requests, errs, weighted, weighted_n, drift_n, drifted_n in rows:
        key = f"{model}@{version}"
        minutes.add(minute)
        if weighted_n:
            p95.setdefault(key, {})[minute] = round(1000.0 * weighted / weighted_n, 3)
        if requests:
            errors.setdefault(key, {})[minute] = round(errs / requests, 5)
        if drift_n:
            drift.setdefault(key, {})[minute] = round(drifted_n / drift_n, 4)
    for model, version, minute, weighted, samples in shadow_rows:
        if samples:
            minutes.add(minute)
            agreement.setdefault(f"{model}@{version}", {})[minute] = round(weighted / samples, 5)
    axis = sorted(minutes)
    return {"x": [m * 60 for m in axis],
            "charts": {name: {"releases": sorted(points), "values": _aligned(points, axis)}
                       for name, points in (("p95_ms", p95), ("error_rate", errors), ("drift", drift),
                                            ("shadow_agreement", agreement))}}


def snapshot(registry, filters: dict | None = None, window_s: float = 3600.0) -> dict:
    """Everything the page shows at once (what each server-sent event carries)."""
    return {"devices": devices_view(registry, filters), "rollouts": rollouts_view(registry),
            "series": series_view(registry, window_s), "time": time.time()}
