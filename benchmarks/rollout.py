"""A rollout to a simulated fleet: time until every device committed, bytes on the wire against
N x the bundle, and the controller's CPU.

    python benchmarks/rollout.py [--devices 200] [--transports mqtt,http,nginx]

One Mosquitto on this machine; the controller (edgepack.fleet.controller, in this process so its chunk
counters can be read) answers chunk requests over MQTT, or the bundles go over HTTP Range requests
from its own server (`fleet serve --http`) or from nginx; the fleet is `edgepack fleet simulate N` in
another process (real MQTT clients, the agent's update code: download, verify every chunk against the
signed list, stage, load and smoke-test with ONNX Runtime, probation, commit). The release is a
~2 MB fp32 MLP (64 -> 1024 -> 448 -> 10), one stage of 100%.

Targets (issue 19): all committed < 60 s; bytes on the wire <= 1.05 x (N x bundle).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from overload import cpu_flags  # noqa: E402


def bundles(folder: Path):
    from converters.pipeline import ConvertOptions, convert
    from edgepack.bundle.signing import generate_keys

    private, public = generate_keys(folder / "keys")
    rng = np.random.default_rng(0)
    np.save(folder / "calib.npy", rng.uniform(0, 1, (64, 64)).astype(np.float32))
    made = {}
    for version, factory in (("1.0.0", "tests.models:wide_mlp"), ("1.1.0", "tests.models:rollout_mlp")):
        (result,) = convert(ConvertOptions(model=factory, profiles=["x86-64"], out=folder / version,
                                           calibration=str(folder / "calib.npy"), input_shapes={"input": [1, 64]},
                                           name="fleet", version=version, recipes=["onnx-fp32"], signing_key=private))
        made[version] = result.bundle
    return made, private, public


def run(transport: str, devices: int, made: dict, private: Path, public: Path) -> dict:
    """One rollout of 1.1.0 to ``devices`` simulated devices, the bundles going over ``transport``:
    ``mqtt`` (chunks from the controller), ``http`` (the controller's own Range server, `fleet serve
    --http`) or ``nginx`` (the shelf folder served by nginx, as a CDN or object store would)."""
    from edgepack.bundle.signing import load_private_key
    from edgepack.fleet import rollouts
    from edgepack.fleet.bundle_http import BundleServer
    from edgepack.fleet.controller import Broker as Address
    from edgepack.fleet.controller import FleetController
    from edgepack.fleet.registry import FleetRegistry
    from edgepack.fleet.releases import BundleShelf, add_release
    from tests.integration.broker import Broker

    folder = Path(tempfile.mkdtemp(prefix=f"edgepack-rollout-{transport}-"))
    (folder / "shelf").mkdir()
    broker = Broker(folder / "broker")
    db = f"sqlite:///{folder / 'fleet.db'}"
    server = nginx = None
    if transport == "http":
        server = BundleServer(folder / "shelf", "127.0.0.1", 0).start()
    elif transport == "nginx":
        from tests.integration.nginx import Nginx

        nginx = Nginx(folder / "shelf").start()
    bundle_url = server.url if server else nginx.url if nginx else None
    controller = FleetController(Address.from_url(broker.url), db, folder / "shelf", client_id="bench",
                                 signing_key=load_private_key(private), tick_s=0.5, bundle_url=bundle_url)
    stop = threading.Event()
    thread = threading.Thread(target=controller.serve, args=(stop,), daemon=True)
    thread.start()
    log = open(folder / "simulator.log", "wb")
    simulator = subprocess.Popen([sys.executable, "-m", "edgepack.cli", "fleet", "simulate", str(devices),
                                  "--broker", broker.url, "--profile", "x86-64", "--key", str(public),
                                  "--install", str(made["1.0.0"]), "--store-root", str(folder / "devices"),
                                  "--group", "all", "--interval", "5", "--probation-s", "1", "--rate", "2",
                                  "--download-window", "8", "--chunk-timeout-s", "10", "--spool-sync", "normal"],
                                 cwd=ROOT, stdout=log, stderr=log)
    registry = FleetRegistry(db)
    try:
        deadline = time.monotonic() + 300
        while sum(r["online"] for r in registry.devices()) < devices and time.monotonic() < deadline:
            time.sleep(0.5)
        for version in ("1.0.0", "1.1.0"):
            add_release(registry, BundleShelf(folder / "shelf"), [made[version]])
        nginx_cpu = _process_cpu(nginx.process.pid) if nginx else 0.0
        cpu_before, sent_before = sum(os.times()[:2]), controller.bytes_sent
        http_before = server.bytes_sent if server else 0
        started = time.perf_counter()
        rollout_id = rollouts.start(registry, "fleet", "1.1.0", {"group": "all"},
                                    {"stages": [{"percent": 100.0}], "soak_s": 0}, {"max_failure_pct": 50})
        while time.monotonic() < deadline + 300:
            (head,) = rollouts.summary(registry, rollout_id)
            if head["counts"].get("committed", 0) + head["counts"].get("failed", 0) >= devices:
                break
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        cpu = sum(os.times()[:2]) - cpu_before
        if nginx:
            nginx_cpu = _process_cpu(nginx.process.pid) - nginx_cpu
            http_bytes = sum(entry["bytes"] for entry in nginx.requests())
        else:
            http_bytes = (server.bytes_sent - http_before) if server else 0
        mqtt_bytes = controller.bytes_sent - sent_before
        (head,) = rollouts.summary(registry, rollout_id)
    finally:
        simulator.terminate()
        simulator.wait(60)
        stop.set()
        thread.join(30)
        broker.stop()
        if server:
            server.stop()
        if nginx:
            nginx.stop()
    return {"transport": transport, "elapsed": elapsed, "cpu": cpu, "server_cpu": nginx_cpu, "mqtt_bytes": mqtt_bytes,
            "http_bytes": http_bytes, "counts": head["counts"], "chunks_dropped": controller.chunks_dropped,
            "chunks_repeated": controller.chunks_repeated, "chunks_refused": controller.chunks_refused}


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LABELS = {"mqtt": "MQTT chunks (128 KiB)", "http": "HTTP Range, `fleet serve --http`", "nginx": "HTTP Range, nginx"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--transports", default="mqtt,http,nginx", help="comma-separated: mqtt, http, nginx")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edgepack-rollout-"))
    made, private, public = bundles(folder)
    size = made["1.1.0"].stat().st_size
    results = [run(transport, args.devices, made, private, public) for transport in args.transports.split(",")]
    print(f"CPU: {cpu_flags()}; {os.cpu_count()} cores; {args.devices} simulated devices in one process, one Mosquitto")
    print("| transfer | bundle | devices committed | seconds to all committed | bytes sent (MQTT + HTTP) | vs N x bundle "
          "| controller CPU s | nginx CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        committed = result["counts"].get("committed", 0)
        wire = result["mqtt_bytes"] + result["http_bytes"]
        result["ratio"] = wire / (args.devices * size)
        print(f"| {LABELS[result['transport']]} | {size / 1e6:.2f} MB | {committed}/{args.devices} | {result['elapsed']:.1f} | "
              f"{result['mqtt_bytes'] / 1e6:.1f} + {result['http_bytes'] / 1e6:.1f} MB | {result['ratio']:.3f}x | "
              f"{result['cpu']:.1f} | {result['server_cpu']:.1f} |")
    for result in results:
        ok = result["elapsed"] < 60 and result["counts"].get("committed", 0) == args.devices
        print(f"{result['transport']}: < 60 s {'met' if ok else 'MISSED'}; <= 1.05x {'met' if result['ratio'] <= 1.05 else 'MISSED'}; "
              + json.dumps({k: result[k] for k in ("counts", "chunks_dropped", "chunks_repeated", "chunks_refused")}))


if __name__ == "__main__":
    main()
