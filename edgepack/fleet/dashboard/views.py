"""What the dashboard shows, read from the fleet registry: devices (filtered), rollouts with their
progress per stage, and per-release time series (p95 latency, error rate, drift, shadow agreement)
aligned on one minute axis, the shape uPlot draws without reshaping in the browser."""

from __future__ import annotations

import time

from sqlalchemy import func, select

from ..db import rollup_shadow, rollups
from ..registry import device_groups
from ..rollouts import summary

#: device filters the page and ``/api/devices`` take
FILTERS = ("group", "tag", "profile", "state", "version", "online")


def device_view(row: dict) -> dict:
    """One device as the table shows it: its models' active/previous versions and update state."""
    state = row.get("state") or {}
    models = {}
    for name, model in (state.get("models") or {}).items():
        if not isinstance(model, dict):
            continue
        update = model.get("update") if isinstance(model.get("update"), dict) else {}
        models[name] = {"active": model.get("active"), "previous": model.get("previous"),
                        "state": update.get("state"), "step": update.get("step"),
                        "shadow": (model.get("shadow") or {}).get("version") if isinstance(model.get("shadow"), dict) else None}
    return {"device": row["device"], "online": bool(row.get("online")), "profile": row.get("profile"),
            "groups": sorted(device_groups(row)), "tags": sorted(row.get("tags") or []), "models": models,
            "last_seen": row.get("last_seen")}


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
    """The latest rollouts (newest first) with counts per stage and status and their verdicts."""
    rows = summary(registry)[-limit:][::-1]
    out = []
    for row in rows:
        strategy = row.get("strategy") or {}
        out.append({"id": row["id"], "kind": row["kind"], "release": f"{row['name']}@{row['version']}" if row.get("version") else row["name"],
                    "state": row["state"], "stage": row["stage"], "requested": row.get("requested"),
                    "stages": [s.get("percent") for s in strategy.get("stages") or []],
                    "shadow_stages": [i for i, s in enumerate(strategy.get("stages") or []) if s.get("shadow")],
                    "devices": row["devices"], "counts": row["counts"], "per_stage": row["stages"],
                    "reason": row.get("reason"), "verdicts": row.get("verdicts") or {},
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
