"""Telemetry ingestion: messages/s one controller (`edgepack fleet serve`, its own process) stores from
1,000 devices, acknowledged only after the commit, on SQLite and on PostgreSQL; and the controller's CPU
per device at the agent's default telemetry interval (10 s).

    python benchmarks/ingest.py [--messages 40000] [--devices 1000] [--no-postgres]

The devices are publishers in other processes (paho, QoS 1, 8 connections, 1,000 device ids), each
message a realistic telemetry body (~900 bytes), sent while the controller is away so the broker queues
them for its session; the controller is then started and timed draining the backlog (from its start,
so connecting is included). The broker is a Mosquitto on a free loopback port with persistence and a
queue large enough for the whole backlog.

Target (issue 19): >= 5,000 messages/s on SQLite.

EDGEPACK_PYSPY=PREFIX (with py-spy on PATH) records 10 s of the timed drain, every thread, as
collapsed stacks in PREFIX-<registry>.txt: where the controller's time goes (last run: the writer
thread 47% of the samples, a third of it the rollup upserts; paho's receive path 35%; both Python,
so they share one core through the GIL).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from overload import cpu_flags  # noqa: E402
from telemetry import cpu_seconds  # noqa: E402


def body(device: str, seq: int) -> bytes:
    return json.dumps({
        "schema": 1, "kind": "telemetry", "device": device, "boot": "0123456789ab", "seq": seq, "ts": time.time(),
        "models": {"digits": {"version": "1.0.0", "requests": {"ok": 97, "error": 1},
                              "latency_s": {"p50": 0.0025, "p95": 0.005, "p99": 0.01},
                              "batch_size": {"p50": 1, "p99": 4}, "queue_depth": 0,
                              "health": {"runs": 98, "errors": 1, "nonfinite": 0, "error_rate": 0.0102},
                              "predictions": {"0": 30, "1": 33, "2": 35}, "update": {"state": "idle", "result": "committed"}}},
        "system": {"cpu_share": 0.12, "rss_bytes": 123456789, "temperature_c": 51.5, "load_1m": 0.4},
        "spool": {"pending": 0, "bytes": 0, "dropped_total": 0, "last_seq": seq},
        "link": {"connected": True, "protocol": "5", "attempts": 1, "failures": 0}, "dropped": 0}).encode()


def publish(port: int, worker: int, workers: int, devices: int, messages: int) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{worker}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    last = None
    for n in range(worker, messages, workers):
        device = n % devices
        last = client.publish(f"edgepack/v1/devices/dev{device:04d}/telemetry", body(f"dev{device:04d}", n // devices + 1), qos=1)
        if n % 2000 < workers:
            last.wait_for_publish(30)  # keep paho's own queue short
    if last:
        last.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def run(db: str, label: str, messages: int, devices: int, folder: Path) -> dict:
    from edgepack.fleet.registry import FleetRegistry
    from tests.integration.broker import Broker

    broker = Broker(folder / f"broker-{label}")
    registry = FleetRegistry(db)
    log = open(folder / f"controller-{label}.log", "wb")
    command = [sys.executable, "-m", "edgepack.cli", "fleet", "serve", "--broker", broker.url, "--db", db,
               "--bundles", str(folder / "shelf"), "--client-id", f"bench-{label}"]
    controller = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
    try:
        # The controller's session (and subscriptions) exist; then it stops, the devices' backlog is queued
        # for it by the broker, and the controller is started again and timed draining it: its own rate,
        # not the load generator's (on 2 cores, Python publishers are slower than the controller).
        time.sleep(2.0)
        controller.terminate()
        controller.wait(30)
        workers = 8
        publishers = [multiprocessing.Process(target=publish, args=(broker.port, w, workers, devices, messages))
                      for w in range(workers)]
        for p in publishers:
            p.start()
        for p in publishers:
            p.join(600)
        controller = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
        profile = os.environ.get("EDGEPACK_PYSPY")  # a py-spy profile of the timed drain (collapsed stacks)
        if profile:
            subprocess.Popen(["py-spy", "record", "--format", "raw", "-r", "200", "-d", "10", "--threads", "--nonblocking", "-p",
                              str(controller.pid), "-o", f"{profile}-{label.split()[0]}.txt"], stdout=log, stderr=log)
        started = time.perf_counter()
        cpu_before = cpu_seconds(controller.pid)
        broker_before = cpu_seconds(broker.process.pid)
        while registry.message_count() < messages and time.perf_counter() - started < 600:
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        stored = registry.message_count()
        cpu = cpu_seconds(controller.pid) - cpu_before
        broker_cpu = cpu_seconds(broker.process.pid) - broker_before
    finally:
        controller.terminate()
        controller.wait(30)
        broker.stop()
    per_message = cpu / max(stored, 1)
    return {"label": label, "stored": stored, "seconds": elapsed, "rate": stored / elapsed, "cpu_s": cpu,
            "broker_cpu_s": broker_cpu,
            "cpu_per_message_ms": per_message * 1000,
            # one device at the default interval sends a message every 10 s
            "cpu_share_per_device": per_message / 10.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edgepack-ingest-"))
    rows = [run(f"sqlite:///{folder / 'fleet.db'}", "SQLite (WAL)", args.messages, args.devices, folder)]
    if not args.no_postgres:
        try:
            import pytest  # the fixture helper skips through pytest when PostgreSQL is missing

            from tests.integration.postgres import Postgres

            try:
                database = Postgres()
            except pytest.skip.Exception as exc:
                print(f"PostgreSQL skipped: {exc}")
            else:
                try:
                    rows.append(run(database.url, "PostgreSQL", args.messages, args.devices, folder))
                finally:
                    database.stop()
        except ImportError as exc:
            print(f"PostgreSQL skipped: {exc}")
    print(f"CPU: {cpu_flags()}; {os.cpu_count()} cores; {args.messages} messages from {args.devices} devices, QoS 1")
    print("| registry | stored | seconds | messages/s | controller CPU s | broker CPU s | CPU per message | "
          "CPU per device at 10 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['stored']} | {r['seconds']:.1f} | {r['rate']:.0f} | {r['cpu_s']:.1f} | "
              f"{r['broker_cpu_s']:.1f} | {r['cpu_per_message_ms']:.3f} ms | {100 * r['cpu_share_per_device']:.4f}% of a core |")
    verdict = "met" if rows[0]["rate"] >= 5000 else "MISSED"
    print(f"target >= 5,000 messages/s on SQLite: {verdict}")


if __name__ == "__main__":
    main()
