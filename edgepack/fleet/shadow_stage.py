"""A rollout's shadow stage: the release runs in shadow on the stage's devices (the active version
answers every request, the candidate sees the same inputs and the device measures how often it
agrees), and is promoted when agreement, error and latency criteria hold over the soak — or the
rollout stops with the numbers.

A member of a shadow stage goes ``pending`` -> ``shadow_offered`` (a desired state naming its active
version, with the release as ``shadow``) -> ``shadowing`` once it reports the candidate running (or
``shadow_failed``). On promotion it is ``shadow_passed``, and the next stage offers it the release
first, as an ordinary update — which the device installs from the shadow's bundle, without a
download. On an abort each one gets a desired state without the shadow (``shadow_ended``).

Agreement comes from the devices' telemetry (the agent's running comparison, the same sums as the
accuracy gate), rolled up in ``rollup_shadow``: the latest cumulative report of each device since the
stage started, weighted by its samples.
"""

from __future__ import annotations

from sqlalchemy import func, select

from .db import rollout_devices, rollup_shadow, rollups

#: statuses of a member in a shadow stage (PASSED: promoted, waiting for the next stage's offer)
OFFERED, RUNNING, FAILED, PASSED, ENDED = "shadow_offered", "shadowing", "shadow_failed", "shadow_passed", "shadow_ended"
ACTIVE_STATUSES = (OFFERED, RUNNING, FAILED)
#: a member whose retained desired state still names the shadow: an abort sends it one without
SHADOWED = ACTIVE_STATUSES + (PASSED,)
DEFAULT_CRITERIA = {"min_agreement": 0.95, "min_shadow_samples": 200, "max_shadow_error_rate": 0.01}


def is_shadow(strategy: dict, stage: int) -> bool:
    stages = strategy.get("stages") or []
    return 0 <= stage < len(stages) and bool(stages[stage].get("shadow"))


def can_shadow(row: dict | None, member: dict) -> str | None:
    """Why ``member`` cannot run the release in shadow (None: it can): its agent must take shadow
    desired states, and it must run a version to compare with."""
    if row is None:
        return "unknown device"
    if "shadow" not in ((row.get("state") or {}).get("accepts") or []):
        return "its agent does not run shadow versions (older than the shadow stage)"
    if not member.get("from_version"):
        return "it runs no version to compare with"
    return None


def refresh(state: dict | None, member: dict, name: str, now: float) -> dict:
    """The new values of a ``shadow_offered`` member from what its device reports."""
    model = ((state or {}).get("models") or {}).get(name) or {}
    shadow = model.get("shadow") if isinstance(model.get("shadow"), dict) else {}
    if shadow.get("version") != member["to_version"]:
        return {}
    if shadow.get("state") == "failed":
        return {"status": FAILED, "finished_at": now, "detail": shadow.get("reason") or "the shadow failed"}
    if shadow.get("state") in ("running", "hung"):
        return {"status": RUNNING, "detail": None}
    return {}


def _latest(registry, name: str, version: str, devices, since: float) -> dict[str, dict]:
    """The latest shadow report of each of ``devices`` (a SELECT of device ids) since ``since``."""
    newest = (select(rollup_shadow.c.device, func.max(rollup_shadow.c.ts).label("ts"))
              .where(rollup_shadow.c.model == name).where(rollup_shadow.c.version == version)
              .where(rollup_shadow.c.device.in_(devices)).where(rollup_shadow.c.ts >= since)
              .group_by(rollup_shadow.c.device).subquery())
    query = (select(rollup_shadow).join(newest, (newest.c.device == rollup_shadow.c.device) & (newest.c.ts == rollup_shadow.c.ts))
             .where(rollup_shadow.c.model == name).where(rollup_shadow.c.version == version))
    with registry.engine.connect() as db:
        return {r.device: dict(r._mapping) for r in db.execute(query)}


def _active_p95(registry, name: str, versions: list[str], devices, since: float) -> float | None:
    with registry.engine.connect() as db:
        weighted, count = db.execute(
            select(func.sum(rollups.c.p95_weighted), func.sum(rollups.c.p95_requests))
            .where(rollups.c.model == name).where(rollups.c.version.in_(versions)).where(rollups.c.device.in_(devices))
            .where(rollups.c.minute >= int(since // 60))).first()
    return float(weighted) / float(count) if count else None


def verdict(registry, rollout: dict, members: list[dict], now: float) -> dict:
    """Agreement, error rate and latency of the release in shadow on the stage's devices against the
    criteria: ``pass``, ``waiting`` (too few samples yet) or ``abort`` with a message."""
    criteria = {**DEFAULT_CRITERIA, **{k: v for k, v in rollout["criteria"].items() if v is not None}}
    since = float(rollout.get("stage_started") or now)
    mine = [m for m in members if m["status"] in (RUNNING, FAILED)]
    # the device ids as a SELECT, not a literal list: a stage can pass PostgreSQL's 65,535 parameters
    stage = (select(rollout_devices.c.device).where(rollout_devices.c.rollout == rollout["id"])
             .where(rollout_devices.c.status.in_((RUNNING, FAILED))))
    reports = _latest(registry, rollout["name"], rollout["version"], stage, since)
    # a report against another active version (the device changed meanwhile) is not this comparison
    reports = {d: r for d, r in reports.items()
               if r.get("active") in (None, next((m["from_version"] for m in mine if m["device"] == d), None))}
    # (a hung run is slow, not failed: the device reports it running again once it returns)
    failed = sorted({m["device"] for m in mine if m["status"] == FAILED}
                    | {d for d, r in reports.items() if r.get("state") == "failed"})
    samples = sum(int(r["samples"] or 0) for r in reports.values())
    agreeing = sum(float(r["agreement"]) * int(r["samples"] or 0) for r in reports.values() if r["agreement"] is not None)
    errors = sum(int(r["errors"] or 0) for r in reports.values())
    timed = [(float(r["latency_p95"]), int(r["samples"] or 0)) for r in reports.values() if r["latency_p95"] is not None]
    shadow_p95 = sum(p * n for p, n in timed) / sum(n for _, n in timed) if timed and sum(n for _, n in timed) else None
    old = sorted({m["from_version"] for m in mine if m["from_version"]})
    active_p95 = _active_p95(registry, rollout["name"], old, stage, since) if reports and old else None
    result = {
        "devices": len(mine), "reporting": len(reports), "failed_devices": failed, "samples": samples,
        "agreement": round(agreeing / samples, 5) if samples else None,
        "error_rate": round(errors / samples, 5) if samples else None,
        "shadow_p95_ms": round(1000 * shadow_p95, 3) if shadow_p95 is not None else None,
        "active_p95_ms": round(1000 * active_p95, 3) if active_p95 is not None else None,
        "latency_ratio": round(shadow_p95 / active_p95, 4) if shadow_p95 and active_p95 else None,
        "criteria": {k: criteria.get(k) for k in ("min_agreement", "min_shadow_samples", "max_shadow_error_rate",
                                                  "max_shadow_latency_ratio", "max_failure_pct")},
        "at": now,
    }
    problems = []
    limit = criteria.get("max_failure_pct")
    if mine and failed and limit is not None and 100.0 * len(failed) / len(mine) >= float(limit):
        problems.append(f"the shadow failed on {len(failed)} of {len(mine)} devices ({', '.join(failed[:5])})")
    if not problems and samples < int(criteria["min_shadow_samples"]):
        result.update(decision="waiting", message=f"{samples} shadow samples from {len(reports)} devices; "
                                                  f"{criteria['min_shadow_samples']} are needed")
        return result
    if result["agreement"] is not None and result["agreement"] < float(criteria["min_agreement"]):
        problems.append(f"agreement {result['agreement']:.4f} < {float(criteria['min_agreement']):g}")
    if result["error_rate"] is not None and result["error_rate"] > float(criteria["max_shadow_error_rate"]):
        problems.append(f"shadow error rate {result['error_rate']:.4f} > {float(criteria['max_shadow_error_rate']):g}")
    ratio_limit = criteria.get("max_shadow_latency_ratio")
    if ratio_limit is not None and result["latency_ratio"] is not None and result["latency_ratio"] > float(ratio_limit):
        problems.append(f"shadow p95 {result['latency_ratio']:.3g}x the active version's > {float(ratio_limit):g}x")
    if problems:
        result.update(decision="abort", message=f"shadow stage {int(rollout['stage']) + 1}: " + "; ".join(problems)
                      + f" (over {samples} samples on {len(reports)} devices)")
    else:
        result["decision"] = "pass"
    return result
