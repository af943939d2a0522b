"""``edgepack fleet simulate`` against a real Mosquitto and a real controller: 20 simulated agents take
a group update through the agent's own update code, scripted install failures roll back, crashed
downloads resume after a reboot, an outage's telemetry arrives from the spool, and the telemetry
carries each release's scripted error rate, latency and predicted classes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgepack.bundle import open_bundle
from edgepack.bundle.signing import generate_keys, load_private_key, sign_manifest
from edgepack.bundle.writer import BundleWriter
from edgepack.fleet.controller import Broker as BrokerAddress
from edgepack.fleet.controller import FleetController

from ..conftest import ROOT, run_cli
from ..models import digits_features
from .broker import Broker

COUNT = 20
FAIL = ["sim-0003", "sim-0004"]  # 1.1.0 does not load there
CRASH = ["sim-0005", "sim-0006"]  # crash the first time a download passes 50% (one per profile)
OFFLINE = "sim-0010"  # loses the network 1 s after it started, for 4 s
SCRIPT = ["1.0.0:error_rate=0.2,classes=1/0/0", "1.1.0:latency_ms=30,error_rate=0,classes=0/0/1"]


def repack(source: Path, out: Path, private: Path, **changes) -> Path:
    """``source`` with other manifest fields (version, profile), signed again: a new release without
    another conversion."""
    with open_bundle(source, verify_files=True) as bundle:
        manifest = {k: v for k, v in bundle.manifest.items() if k != "files"}
        files = {name: bundle.read_file(name) for name in bundle.manifest["files"]}
    writer = BundleWriter()
    for name, data in files.items():
        writer.add_bytes(name, data)
    manifest.update(changes)
    _, manifest_bytes = writer.build(manifest)
    writer.write(out, manifest, sign_manifest(manifest_bytes, load_private_key(private)))
    return out


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """The 1.2 MB "wide" model (ten chunks) 1.0.0 and 1.1.0 for x86-64 and rpi4, signed; the keys."""
    from converters.pipeline import ConvertOptions, convert

    folder = tmp_path_factory.mktemp("sim-bundles")
    private, public = generate_keys(folder / "keys")
    features, _ = digits_features(64)
    np.save(folder / "calib.npy", features)
    (result,) = convert(ConvertOptions(model="tests.models:wide_mlp", profiles=["x86-64"], out=folder / "converted",
                                       calibration=str(folder / "calib.npy"), input_shapes={"input": [1, 64]},
                                       name="wide", version="1.0.0", recipes=["onnx-fp32"], signing_key=private))
    made = {}
    for version in ("1.0.0", "1.1.0"):
        for profile in ("x86-64", "rpi4"):
            made[(version, profile)] = repack(result.bundle, folder / f"wide-{version}-{profile}.edgepack", private,
                                              version=version, profile=profile)
    return {"bundles": made, "private": private, "public": public}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Simulator:
    """``edgepack fleet simulate`` as a real process, its status file and its output."""

    def __init__(self, tmp: Path, broker: Broker, setup: dict, *extra: str):
        self.status_file = tmp / "status.json"
        self.status_file.unlink(missing_ok=True)
        bundles = setup["bundles"]
        self.log = open(tmp / "simulate.log", "a")
        self.args = [
            sys.executable, "-m", "edgepack.cli", "fleet", "simulate", str(COUNT), "--broker", broker.url,
            "--profile", "x86-64,rpi4", "--key", str(setup["public"]),
            "--install", f"{bundles[('1.0.0', 'x86-64')]},{bundles[('1.0.0', 'rpi4')]}",
            "--store-root", str(tmp / "stores"), "--group", "sim", "--status", str(self.status_file),
            "--interval", "1", "--rate", "10", "--log-level", "warning", *extra]
        self.process = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(line.rstrip("\n") for line in self.process.stdout),
                         daemon=True).start()

    def status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}

    def devices(self) -> dict:
        return self.status().get("devices", {})

    def wait_connected(self, timeout: float = 60) -> None:
        try:
            wait_for(lambda: any("devices connected" in line for line in self.lines), timeout, "every device connected")
        except AssertionError:
            raise AssertionError(f"not connected: {self.status().get('ready')}; log:\n{self.tail()}") from None

    def tail(self) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text().splitlines()[-30:])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()


@pytest.fixture()
def fleet(tmp_path):
    broker = Broker(tmp_path / "broker")
    address = BrokerAddress.from_url(broker.url)
    controller = FleetController(address, f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path / "shelf")
    stop = threading.Event()
    thread = threading.Thread(target=controller.serve, args=(stop,), daemon=True)
    thread.start()
    assert controller.connected.wait(10)
    yield broker, controller
    stop.set()
    thread.join(15)
    broker.stop()


def _model(row: dict) -> dict:
    return ((row.get("state") or {}).get("models") or {}).get("wide") or {}


def test_simulated_fleet_takes_a_group_update(tmp_path, fleet, releases):
    broker, controller = fleet
    ids = [f"sim-{i:04d}" for i in range(1, COUNT + 1)]
    sim = Simulator(tmp_path, broker, releases, *(f"--metrics={m}" for m in SCRIPT),
                    "--fail-install", f"1.1.0:{'+'.join(FAIL)}", "--crash-download", "+".join(CRASH),
                    "--offline", f"{OFFLINE}:1:4")
    try:
        sim.wait_connected()
        devices = sim.devices()
        assert sorted(devices) == ids
        assert {d["profile"] for i, d in devices.items() if int(i[-4:]) % 2} == {"x86-64"}  # round-robin
        assert {d["profile"] for i, d in devices.items() if not int(i[-4:]) % 2} == {"rpi4"}
        assert all(d["active"] == "1.0.0" for d in devices.values())
        time.sleep(1.5)  # some telemetry of 1.0.0
        began = time.monotonic()
        bundles = releases["bundles"]
        pushed = run_cli("fleet", "push", bundles[("1.1.0", "x86-64")], bundles[("1.1.0", "rpi4")], "--group", "sim",
                         "--key", releases["private"], "--broker", broker.url, "--bundles", tmp_path / "shelf",
                         "--db", f"sqlite:///{tmp_path / 'fleet.db'}")
        assert pushed.returncode == 0, pushed.stderr

        def settled():
            now = sim.devices()
            done = [d for d in now.values() if d.get("update_state") == "idle" and d.get("target") == "1.1.0"
                    and d.get("result") in ("committed", "rolled_back")]
            return now if len(done) == COUNT else None

        try:
            devices = wait_for(settled, 60, "every device to finish the update")
        except AssertionError:
            raise AssertionError(f"{json.dumps(sim.devices(), indent=1)[-3000:]}\n{sim.tail()}") from None
        took = time.monotonic() - began
        print(f"\n{COUNT} simulated devices: push to all settled in {took:.1f} s")
        for device, state in devices.items():
            if device in FAIL:
                assert (state["active"], state["result"], state["serving"]) == ("1.0.0", "rolled_back", "1.0.0"), state
                assert "scripted install failure" in state["reason"], state
            else:
                assert (state["active"], state["result"], state["serving"]) == ("1.1.0", "committed", "1.1.0"), state
        assert all(devices[d]["boots"] == 2 and devices[d]["crashes"] == 1 for d in CRASH), devices
        assert all(d["boots"] == 1 for i, d in devices.items() if i not in CRASH)

        # What the fleet sees: the retained states and the events.
        def registry_settled():
            rows = {r["device"]: r for r in controller.registry.devices()}
            return rows if all(_model(rows.get(i, {})).get("update", {}).get("result") in ("committed", "rolled_back")
                               for i in ids) else None

        rows = wait_for(registry_settled, 20, "the retained states of every device")
        for device in ids:
            model = _model(rows[device])
            assert rows[device]["online"] and model["active"] == ("1.0.0" if device in FAIL else "1.1.0"), rows[device]
        for device in FAIL:
            assert "scripted install failure" in _model(rows[device])["update"]["reason"]
            steps = [e["body"] for e in controller.registry.messages(device, "event", 10_000) if e["event"] == "update"]
            assert ("probation", "rolling_back") in [(s["from"], s["to"]) for s in steps], steps
        for device in CRASH:
            events = controller.registry.messages(device, "event", 10_000)
            boots = list(dict.fromkeys(e["boot"] for e in events))
            assert len(boots) == 2, boots
            progress = [e["body"]["percent"] for e in events if e["event"] == "download_progress" and e["boot"] == boots[1]]
            assert progress and progress[0] >= 50, progress  # resumed from the chunks on disk, not from 0

        # The outage: what was spooled while offline arrived late, and nothing of the boot is missing.
        sent = controller.registry.messages(OFFLINE, None, 10_000)
        seqs = sorted(m["seq"] for m in sent)
        assert seqs == list(range(1, len(seqs) + 1)), seqs  # one boot: sequence numbers 1, 2, 3… once each
        late = [m for m in sent if m["kind"] == "telemetry" and m["received"] - m["ts"] > 2.0]
        assert late, "no telemetry was delivered late"

        # Telemetry per version: the scripted error rates, latency and predicted classes.
        figures = {"1.0.0": {"ok": 0, "error": 0, "classes": set(), "p50": []},
                   "1.1.0": {"ok": 0, "error": 0, "classes": set(), "p50": []}}
        for row in controller.registry.messages(None, "telemetry", 100_000):
            model = row["body"]["models"].get("wide") or {}
            version = model.get("version")
            if version not in figures:
                continue
            figure = figures[version]
            for outcome, count in (model.get("requests") or {}).items():
                figure[outcome] += count
            figure["classes"] |= set(model.get("predictions") or {})
            if (model.get("latency_s") or {}).get("p50"):
                figure["p50"].append(model["latency_s"]["p50"])
        old, new = figures["1.0.0"], figures["1.1.0"]
        assert old["ok"] + old["error"] > 200 and new["ok"] > 200, figures
        assert 0.12 < old["error"] / (old["ok"] + old["error"]) < 0.3, figures
        assert new["error"] / (new["ok"] + new["error"]) < 0.05, figures  # a swap's first message may hold old ones
        assert old["classes"] == {"0"} and new["classes"] == {"2"}, figures
        assert np.median(new["p50"]) > np.median(old["p50"]), figures
    finally:
        code = sim.stop()
    assert code == 0, sim.tail()
    # A clean stop leaves every device offline (its FleetLink.close()).
    wait_for(lambda: not any(r["online"] for r in controller.registry.devices()), 20, "every device offline")

    # Started again on the same stores: every device keeps what it has (no reinstall) and serves it.
    again = Simulator(tmp_path, broker, releases, "--duration", "30")
    try:
        again.wait_connected()
        states = wait_for(lambda: (lambda d: d if d and all(s["serving"] for s in d.values()) else None)(again.devices()),
                          20, "every device serving")
        assert all(s["active"] == ("1.0.0" if i in FAIL else "1.1.0") for i, s in states.items()), states
        assert all(s["serving"] == s["active"] for s in states.values()), states
    finally:
        assert again.stop() == 0
    assert Path(again.log.name).read_text().count(f"0 stores installed, {COUNT} kept") == 1


def test_scripts_and_fault_specs_parse():
    from edgepack.errors import UsageError
    from edgepack.fleet.simulator import Faults, Release, parse_script, select

    script = parse_script(["default:latency_ms=20", "1.1.0:error_rate=0.05,classes=0.2/0.3/0.5",
                           "2.0.0:classes=cat:1/dog:3,sigma=0"])
    assert script["default"] == Release(latency_ms=20.0)
    assert script["1.1.0"] == Release(latency_ms=20.0, error_rate=0.05, classes=(("0", 0.2), ("1", 0.3), ("2", 0.5)))
    assert script["2.0.0"].classes == (("cat", 1.0), ("dog", 3.0)) and script["2.0.0"].latency_sigma == 0.0
    ids = [f"sim-{i:04d}" for i in range(1, 11)]
    assert select("0.2", ids, "--x") == {"sim-0001", "sim-0002"}
    assert select("0.01", ids, "--x") == {"sim-0001"} and select("0", ids, "--x") == set()
    assert select("sim-0003+sim-0007", ids, "--x") == {"sim-0003", "sim-0007"} and select("all", ids, "--x") == set(ids)
    faults = Faults.parse(ids, ["1.1.0:0.1", "1.1.0:sim-0009"], ["sim-0002:5:10"], ["sim-0004"])
    assert faults.fail_install == {"1.1.0": {"sim-0001", "sim-0009"}}
    assert faults.offline == [({"sim-0002"}, 5.0, 10.0)] and faults.crash_download == {"sim-0004"}
    for bad in (lambda: select("sim-0099", ids, "--x"), lambda: select("1.5", ids, "--x"),
                lambda: parse_script(["1.1.0:error_rate=2"]), lambda: parse_script(["1.1.0:speed=3"]),
                lambda: parse_script(["nocolon"]), lambda: Faults.parse(ids, offline=["sim-0001:5"])):
        with pytest.raises(UsageError):
            bad()
