"""Telemetry publishing: messages/s the agent's publisher sustains at QoS 1 (spool -> broker -> PUBACK ->
delete) against ``mosquitto_pub`` on the same broker, and the agent's CPU share at the default
telemetry rate while it serves requests.

    python benchmarks/telemetry.py [--messages 5000] [--seconds 30]

Target (issue 11): the agent's publisher >= 0.2x mosquitto_pub.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from overload import cpu_flags  # noqa: E402

PAYLOAD = json.dumps({"schema": 1, "kind": "telemetry", "device": "dev1", "boot": "0123456789ab", "seq": 0,
                      "models": {"m": {"requests": {"ok": 100}, "latency_s": {"p50": 0.001, "p95": 0.0025}}},
                      "system": {"cpu_share": 0.1, "rss_bytes": 123456789, "temperature_c": 51.5}, "pad": "x" * 300})


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mosquitto_pub_rate(port: int, count: int) -> float:
    lines = ("\n".join([PAYLOAD] * count) + "\n").encode()
    started = time.perf_counter()
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", "bench/pub", "-l"],
                   input=lines, check=True)
    return count / (time.perf_counter() - started)


def agent_rate(fleet, count: int) -> float:
    """Fill the agent's spool with ``count`` messages while it is stopped, start it, time the drain."""
    from agent.fleet.spool import Spool

    spool = Spool(fleet.store / "spool.sqlite")
    for _ in range(count):
        spool.add("telemetry", "edgepack/v1/devices/dev1/telemetry", lambda seq, dropped: {**json.loads(PAYLOAD), "seq": seq})
    spool.close()
    agent = fleet.start_agent()
    connected = None
    while connected is None:
        connected = next((e for e in agent.logs if e.get("msg") == "mqtt connected"), None)
        time.sleep(0.01)
    started = time.perf_counter()
    import sqlite3

    while True:
        with sqlite3.connect(fleet.store / "spool.sqlite") as db:
            if db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0:
                break
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    agent.stop()
    return count / elapsed


def cpu_share(fleet, seconds: float, with_mqtt: bool) -> float:
    """The agent's CPU seconds per second while serving ~50 requests/s, with or without the fleet link."""
    from tests.integration.test_fleet import infer

    config = json.loads(fleet.config.read_text())
    if not with_mqtt:
        config.pop("mqtt", None)
    config["telemetry"] = {}  # the default interval
    path = fleet.tmp / ("with.yaml" if with_mqtt else "without.yaml")
    path.write_text(json.dumps(config))
    from tests.integration.daemon import Daemon

    agent = Daemon("--config", path)
    time.sleep(2.0)
    before, started = cpu_seconds(agent.process.pid), time.monotonic()
    while time.monotonic() - started < seconds:
        infer(agent.url, float(np.random.uniform(0.1, 1.0)))
        time.sleep(0.02)
    share = (cpu_seconds(agent.process.pid) - before) / (time.monotonic() - started)
    agent.stop()
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    from converters.pipeline import ConvertOptions, convert
    from edgepack.bundle.signing import generate_keys
    from tests.integration.test_fleet import Fleet

    work = Path(tempfile.mkdtemp(prefix="edgepack-telemetry-bench-"))
    private, public = generate_keys(work / "keys")
    np.save(work / "calib.npy", np.random.default_rng(0).uniform(0.1, 1.0, (64, 8)).astype(np.float32))
    (result,) = convert(ConvertOptions(model="tests.models:fleet_good", profiles=["x86-64"], out=work / "b",
                                       calibration=str(work / "calib.npy"), input_shapes={"input": [1, 8]},
                                       name="fleet", version="1.0.0", recipes=["onnx-fp32"], signing_key=private))
    fleet = Fleet(work / "run", {"bundles": {("1.0.0", "x86-64"): result.bundle}, "private": private, "public": public})
    try:
        baseline = mosquitto_pub_rate(fleet.broker.port, args.messages)
        agent = agent_rate(fleet, args.messages)
        without = cpu_share(fleet, args.seconds, False)
        with_link = cpu_share(fleet, args.seconds, True)
    finally:
        fleet.close()
    print(f"CPU: {cpu_flags()}")
    print(f"| publisher (QoS 1, {len(PAYLOAD)}-byte messages, {args.messages}) | messages/s | vs mosquitto_pub |")
    print("|---|---|---|")
    print(f"| mosquitto_pub -l | {baseline:.0f} | 1.00x |")
    print(f"| edgepack agent (spool -> PUBACK -> delete) | {agent:.0f} | {agent / baseline:.2f}x |")
    print()
    print(f"| agent serving ~40 req/s for {args.seconds:g} s | CPU share (CPU s per s) |")
    print("|---|---|")
    print(f"| without mqtt | {without:.3f} |")
    print(f"| with mqtt, telemetry every 10 s (default) | {with_link:.3f} ({with_link - without:+.3f}) |")


if __name__ == "__main__":
    main()
