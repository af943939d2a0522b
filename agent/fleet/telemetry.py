"""What one telemetry message says: serving figures since the last message, the device's resources,
the models and their update state. Read from the same Prometheus collectors ``GET /metrics`` shows.
"""

from __future__ import annotations

import glob
import os
import time
import weakref

#: metric families summarised per model
_REQUESTS = "edgepack_requests_total"
_LATENCY = "edgepack_request_seconds_bucket"
_BATCH = "edgepack_batch_size_bucket"
_DEPTH = "edgepack_queue_depth"


def _labels(text: str) -> dict:
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def _quantiles(buckets: dict[float, float], quantiles=(0.5, 0.95, 0.99)) -> dict:
    """Quantiles from cumulative histogram bucket counts (the bucket's upper bound, as Prometheus's
    histogram_quantile does without interpolation)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    result = {}
    for q in quantiles:
        if not total:
            result[f"p{round(q * 100)}"] = None
            continue
        bound = next(b for b in bounds if buckets[b] >= q * total)
        result[f"p{round(q * 100)}"] = None if bound == float("inf") else bound
    return result


def read_temperature() -> float | None:
    """The hottest thermal zone in °C, where /sys/class/thermal is readable (a Pi, a Jetson)."""
    hottest = None
    for path in glob.glob("/sys/class/thermal/thermal_zone*/temp"):
        try:
            value = int(open(path).read().strip()) / 1000
        except (OSError, ValueError):
            continue
        hottest = value if hottest is None else max(hottest, value)
    return hottest


def read_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class TelemetryCollector:
    """Builds telemetry bodies; counters are sent as deltas since the previous body (and totals)."""

    def __init__(self, metrics, registry=None, store=None):
        self.metrics = metrics
        self.registry = registry
        self.store = store
        self._last: dict = {}
        self._last_cpu = (time.monotonic(), sum(os.times()[:2]))

    def _cpu_share(self) -> float:
        now, used = time.monotonic(), sum(os.times()[:2])
        then, before = self._last_cpu
        self._last_cpu = (now, used)
        return (used - before) / (now - then) if now > then else 0.0

    def _predictions(self, name: str, served, counts) -> dict:
        """Predicted classes (label -> count) since the previous message, from the served version's
        cumulative ``predictions``; a version swapped in since then counts from zero."""
        totals = {str(label): int(count) for label, count in dict(counts).items()}
        try:
            marker = weakref.ref(served)  # not id() where it can be: a retired version's id may be reused
        except TypeError:
            marker = id(served)
        seen, before = self._last.get(("predictions", name), (None, {}))
        same = seen() is served if isinstance(seen, weakref.ref) else seen is not None and seen == id(served)
        if not same:
            before = {}
        self._last[("predictions", name)] = (marker, totals)
        return {label: count - before.get(label, 0) for label, count in totals.items() if count - before.get(label, 0) > 0}

    def collect(self, extra: dict | None = None) -> dict:
        snapshot = self.metrics.snapshot()
        models: dict[str, dict] = {}
        for labels, value in snapshot.get(_REQUESTS, {}).items():
            info = _labels(labels)
            models.setdefault(info["model"], {}).setdefault("requests_total", {})[info["outcome"]] = int(value)
        latency: dict[str, dict[float, float]] = {}
        for labels, value in snapshot.get(_LATENCY, {}).items():
            info = _labels(labels)
            latency.setdefault(info["model"], {})[float(info["le"])] = value
        batches: dict[str, dict[float, float]] = {}
        for labels, value in snapshot.get(_BATCH, {}).items():
            info = _labels(labels)
            batches.setdefault(info["model"], {})[float(info["le"])] = value
        for labels, value in snapshot.get(_DEPTH, {}).items():
            models.setdefault(_labels(labels)["model"], {})["queue_depth"] = int(value)
        for name, buckets in latency.items():
            before = self._last.get(("latency", name), {})
            delta = {b: c - before.get(b, 0) for b, c in buckets.items()}
            self._last[("latency", name)] = buckets
            models.setdefault(name, {})["latency_s"] = _quantiles(delta)
        for name, buckets in batches.items():
            before = self._last.get(("batch", name), {})
            delta = {b: c - before.get(b, 0) for b, c in buckets.items()}
            self._last[("batch", name)] = buckets
            models.setdefault(name, {})["batch_size"] = _quantiles(delta, (0.5, 0.99))
        for name, info in models.items():
            totals = info.get("requests_total", {})
            before = self._last.get(("requests", name), {})
            info["requests"] = {k: v - before.get(k, 0) for k, v in totals.items() if v - before.get(k, 0)}
            self._last[("requests", name)] = dict(totals)
        if self.registry is not None:
            for name, scheduler in self.registry.schedulers.items():
                entry = models.setdefault(name, {})
                if scheduler.current:
                    entry["version"] = scheduler.current.version
                    entry["health"] = scheduler.current.health.summary()
                    if scheduler.current.drift is not None:
                        # the watcher's latest scores (worked out off the event loop), else now
                        drift = scheduler.current.drift
                        entry["drift"] = drift.latest if drift.latest is not None else drift.scores()
                    counts = getattr(scheduler.current, "predictions", None)
                    if counts is not None:
                        entry["predictions"] = self._predictions(name, scheduler.current, counts)
                if getattr(scheduler, "shadow", None) is not None:
                    entry["shadow"] = scheduler.shadow.summary()  # cumulative since it loaded
                if getattr(scheduler, "split", None) is not None:
                    split = scheduler.split
                    entry["split"] = {"version": split.version, "percent": split.percent,
                                      "health": split.served.health.summary()}
        if self.store is not None:
            for name in models:
                try:
                    update = self.store.state(name)["update"]
                except Exception:  # noqa: BLE001 - telemetry reports what it can read
                    continue
                models[name]["update"] = {"state": update["state"], "result": update.get("result")}
        body = {
            "models": models,
            "system": {"cpu_share": round(self._cpu_share(), 4), "rss_bytes": read_rss_bytes(),
                       "temperature_c": read_temperature(), "load_1m": os.getloadavg()[0]},
        }
        if extra:
            body.update(extra)
        return body
