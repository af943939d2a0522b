"""What the dashboard costs the controller: one registry snapshot (devices and the latest rollouts;
an hour of per-release series) and its JSON, for fleets of 100 to 5,000 devices, on SQLite, and the
share of a core its poller takes under its schedule (devices every second, series every 15 s, both
less often when they cost more: edgepack.fleet.dashboard.server.plan), against reading everything
every second (the first version of the dashboard).

    .venv/bin/python benchmarks/dashboard.py [--devices 100,1000,5000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from overload import cpu_flags  # noqa: E402

from edgepack.fleet import rollouts  # noqa: E402
from edgepack.fleet.dashboard import views  # noqa: E402
from edgepack.fleet.dashboard.server import plan  # noqa: E402
from edgepack.fleet.db import release_bundles, releases  # noqa: E402
from edgepack.fleet.registry import FleetRegistry  # noqa: E402


def seed(registry: FleetRegistry, count: int) -> None:
    """``count`` devices on two profiles with an hour of telemetry (one message a minute each), two
    releases and five rollouts over all of them."""
    now = time.time()
    batch = []
    for i in range(count):
        device = f"dev-{i:05d}"
        batch.append((device, "state", {"online": i % 10 != 0, "profile": "rpi4" if i % 2 else "x86-64", "boot": "b",
                                        "ts": now, "groups": ["all"], "accepts": ["renews", "shadow"],
                                        "models": {"m": {"active": "1.0.0", "previous": "0.9.0",
                                                         "update": {"state": "idle", "result": "committed"}}}}))
        for minute in range(60):
            batch.append((device, "telemetry", {
                "kind": "telemetry", "boot": "b", "seq": minute, "ts": now - 60 * (60 - minute),
                "models": {"m": {"version": "1.0.0", "requests": {"ok": 100, "error": 1}, "latency_s": {"p95": 0.012},
                                 "predictions": {"0": 50, "1": 50}}}}))
        if len(batch) > 20_000:
            registry.store_batch(batch)
            batch = []
    registry.store_batch(batch)
    with registry.engine.begin() as db:
        for version in ("1.0.0", "1.1.0"):
            db.execute(releases.insert().values(name="m", version=version, created=now))
            for profile in ("x86-64", "rpi4"):
                db.execute(release_bundles.insert().values(name="m", version=version, profile=profile, sha256="0" * 64))
    for _ in range(5):
        rollout_id = rollouts.start(registry, "m", "1.1.0", {"group": "all"})
        rollouts.request(registry, rollout_id, "abort")
        with registry.engine.begin() as db:
            db.execute(rollouts.rollouts.update().where(rollouts.rollouts.c.id == rollout_id).values(state="aborted"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="100,1000,5000")
    parser.add_argument("--rounds", type=int, default=10)
    options = parser.parse_args()
    print(f"CPU: {cpu_flags()}")
    print("| devices | devices + rollouts p50 | series p50 | JSON | poll / series every | share of a core: "
          "everything every second | share of a core: the poller's schedule |")
    print("|---|---|---|---|---|---|---|")
    for count in (int(c) for c in options.devices.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            registry = FleetRegistry(f"sqlite:///{folder}/fleet.db")
            seed(registry, count)
            fast, series = [], []
            for _ in range(options.rounds):
                began = time.perf_counter()
                snapshot = {"devices": views.devices_view(registry), "rollouts": views.rollouts_view(registry)}
                json.dumps(snapshot, default=str, separators=(",", ":"))  # the encoding is part of the cost
                middle = time.perf_counter()
                snapshot["series"] = views.series_view(registry)
                series.append(time.perf_counter() - middle)
                fast.append(middle - began)
            size = len(json.dumps(snapshot, default=str, separators=(",", ":")))
            f, s_ = statistics.median(fast), statistics.median(series)
            poll, every = plan(f, s_)
            print(f"| {count:,} | {1000 * f:.1f} ms | {1000 * s_:.1f} ms | {size / 1e6:.2f} MB | {poll:.1f} s / {every:.0f} s | "
                  f"{100 * (f + s_):.1f}% | {100 * (f / poll + s_ / every):.1f}% |")
            registry.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
