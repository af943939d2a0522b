"""Delivering a model update over MQTT: time and bytes on the wire for a ~5 MB bundle to one device,
the re-fetch after a broker cut mid-transfer, and the agent's peak RSS during it.

    python benchmarks/update.py

Targets (issue 11): bytes on the wire <= 1.05x the bundle size; a cut mid-transfer re-fetches at
most one chunk (beyond the chunks in flight when it was cut).

Second table (issue 17): what probation enforces comes from the signed desired state. A tiny model
updated to a much slower one commits when the budget allows it (no ``max_latency_ratio``: the default
only catches a broken model) and is rolled back when the budget says ``max_latency_ratio: 3``; the
ratio is the one the device timed, both versions side by side at the switch.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from overload import cpu_flags  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    from converters.pipeline import ConvertOptions, convert
    from edgepack.bundle.signing import generate_keys
    from edgepack.fleet import chunks
    from tests.integration.test_fleet import Fleet, wait_for

    work = Path(tempfile.mkdtemp(prefix="edgepack-update-bench-"))
    private, public = generate_keys(work / "keys")
    np.save(work / "calib.npy", np.random.default_rng(0).uniform(0.1, 1.0, (64, 8)).astype(np.float32))
    made = {}
    for factory, version in [("fleet_good", "1.0.0"), ("fleet_large", "2.0.0"), ("fleet_large", "2.1.0"),
                             ("fleet_slow", "3.0.0"), ("fleet_slow", "3.1.0")]:
        (result,) = convert(ConvertOptions(model=f"tests.models:{factory}", profiles=["x86-64"], out=work / version,
                                           calibration=str(work / "calib.npy"), input_shapes={"input": [1, 8]},
                                           name="fleet", version=version, recipes=["onnx-fp32"], signing_key=private))
        made[(version, "x86-64")] = result.bundle
    setup = {"bundles": made, "private": private, "public": public}
    rows = []
    for label, version, cut in [("clean transfer", "2.0.0", False), ("broker cut at ~50%", "2.1.0", True)]:
        fleet = Fleet(work / f"run-{version}", setup, probation_s=1.0, interval_s=10.0)
        config = json.loads(fleet.config.read_text())
        config["updates"].pop("chunk_timeout_s")  # the default (10 s), not the tests' short one
        fleet.config.write_text(json.dumps(config))
        try:
            fleet.start_controller()
            agent = fleet.start_agent()
            time.sleep(1.0)
            size = made[(version, "x86-64")].stat().st_size
            count = chunks.chunk_count(size)
            started = time.monotonic()
            fleet.push(version)
            if cut:
                def half():
                    files = list((fleet.store / "downloads").glob("*.json")) if (fleet.store / "downloads").exists() else []
                    return files and len(json.loads(files[0].read_text()).get("received", [])) >= count // 2
                wait_for(half, 60, "half the chunks")
                fleet.broker.stop()
                time.sleep(2.0)
                fleet.broker.start()
            try:
                wait_for(lambda: fleet.active() == version and fleet.update()["result"] == "committed", 300, "the commit")
            except AssertionError:
                print("\n".join(agent.lines[-15:]), json.dumps(fleet.update())[:3000], file=sys.stderr)
                raise
            elapsed = time.monotonic() - started
            # MQTT framing per chunk message: fixed header (<= 5), topic length + topic, packet id (QoS 1)
            framing = fleet.controller.chunks_sent * (5 + 2 + len(f"edgepack/v1/devices/{'dev1'}/chunks/data") + 2)
            rows.append((label, size, count, fleet.controller.chunks_sent, fleet.controller.bytes_sent + framing, elapsed,
                         peak_rss_mib(agent.process.pid)))
        finally:
            fleet.close()
    verdicts = []
    for label, version, budget in [("budget allows it (no latency limit)", "3.0.0", None),
                                   ("budget max_latency_ratio 3", "3.1.0", {"max_latency_ratio": 3.0})]:
        fleet = Fleet(work / f"run-{version}", setup, probation_s=2.0, interval_s=10.0)
        try:
            fleet.start_controller()
            agent = fleet.start_agent()
            time.sleep(1.0)
            fleet.push(version, probation=budget)
            wait_for(lambda: (fleet.update().get("target") or {}).get("version") == version
                     and fleet.update()["state"] == "idle" and fleet.update().get("result"), 120, "the verdict")
            ratio = next((json.loads(line).get("ratio") for line in agent.lines if 'timed side by side' in line), None)
            verdicts.append((label, fleet.update()["result"], fleet.active(), ratio, fleet.update().get("reason")))
        finally:
            fleet.close()
    print(f"CPU: {cpu_flags()}")
    print("| transfer | bundle bytes | chunks | chunks sent | bytes on the wire (frames + MQTT framing) | wire / bundle | re-fetched chunks | "
          "push -> committed (s, incl. 1 s probation) | agent peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, size, count, sent, sent_bytes, elapsed, rss in rows:
        print(f"| {label} | {size} | {count} | {sent} | {sent_bytes} | {sent_bytes / size:.4f} | {sent - count} | "
              f"{elapsed:.2f} | {rss:.0f} |")
    print()
    print("| 1.0.0 (tiny) -> much slower version | result | active after | new/old time per sample, side by side | reason |")
    print("|---|---|---|---|---|")
    for label, result, active, ratio, reason in verdicts:
        print(f"| {label} | {result} | {active} | {ratio if ratio is None else f'{ratio:.1f}x'} | {(reason or '')[:110]} |")


if __name__ == "__main__":
    main()
