"""Rollouts end to end: a real Mosquitto, the real controller (`edgepack fleet serve --key`) and the real
CLI as processes, and a simulated fleet (`edgepack fleet simulate`: real MQTT clients, the agent's real
update code and stores, scripted inference metrics and faults)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from edgepack.fleet.db import desired, messages
from edgepack.fleet.registry import FleetRegistry

from ..conftest import run_cli
from .broker import Broker

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout=60.0, what="condition", every=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


class Setup:
    """Broker, controller process(es), simulator process and the CLI around one registry."""

    def __init__(self, tmp: Path, bundles: dict, db: str | None = None):
        self.tmp, self.bundles = tmp, bundles
        self.broker = Broker(tmp / "broker")
        self.db = db or f"sqlite:///{tmp / 'fleet.db'}"
        self.registry = FleetRegistry(self.db)
        self.processes: list[subprocess.Popen] = []

    def _spawn(self, *args, log: str) -> subprocess.Popen:
        out = open(self.tmp / f"{log}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "edgepack.cli", *map(str, args)], cwd=ROOT,
                                   stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.processes.append(process)
        return process

    def controller(self, client_id: str = "ctl", *extra) -> subprocess.Popen:
        return self._spawn("fleet", "serve", "--broker", self.broker.url, "--db", self.db, "--bundles", self.tmp / "shelf",
                           "--key", self.bundles["private"], "--tick", "0.5", "--client-id", client_id, *extra,
                           log=f"controller-{client_id}")

    def simulate(self, count: int, *extra, profiles: str = "x86-64", installs=None) -> subprocess.Popen:
        installs = installs or [self.bundles["bundles"][("1.0.0", "x86-64")]]
        return self._spawn("fleet", "simulate", count, "--broker", self.broker.url, "--profile", profiles,
                           "--key", self.bundles["public"], *[a for p in installs for a in ("--install", p)],
                           "--store-root", self.tmp / "devices", "--group", "all", "--interval", "1",
                           "--probation-s", "1", "--rate", "20", *extra, log="simulator")

    def cli(self, *args):
        done = run_cli("fleet", *args, "--db", self.db)
        assert done.returncode == 0, done.stderr
        return done

    def release(self, *keys) -> None:
        self.cli("release", "add", *[self.bundles["bundles"][k] for k in keys], "--bundles", self.tmp / "shelf")

    def show(self, rollout_id: int) -> dict:
        return json.loads(self.cli("rollout", "show", str(rollout_id), "--json").stdout)

    def start(self, *args) -> int:
        return json.loads(self.cli("rollout", "start", *args, "--json").stdout)["id"]

    def active(self) -> dict[str, str | None]:
        return {row["device"]: ((row["state"] or {}).get("models", {}).get("fleet") or {}).get("active")
                for row in self.registry.devices()}

    def online(self, count: int) -> None:
        wait_for(lambda: sum(1 for r in self.registry.devices() if r["online"]) >= count, 120, f"{count} devices online")

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.broker.stop()


@pytest.fixture()
def setup(tmp_path, fleet_bundles):
    made = Setup(tmp_path, fleet_bundles)
    yield made
    made.close()


def _offers(registry, rollout_id: int) -> dict[str, int]:
    with registry.engine.connect() as db:
        rows = db.execute(select(desired.c.topic, func.count()).where(desired.c.rollout == rollout_id)
                          .where(desired.c.purpose == "offer").group_by(desired.c.topic)).all()
    return {topic.split("/")[3]: count for topic, count in rows}


def _update_steps(registry, version: str) -> dict[str, set]:
    with registry.engine.connect() as db:
        rows = db.execute(select(messages.c.device, messages.c.body).where(messages.c.event == "update")).all()
    steps: dict[str, set] = {}
    for device, body in rows:
        if body.get("version") == version:
            steps.setdefault(device, set()).add(body.get("step"))
    return steps


def test_install_failures_abort_the_rollout_and_every_updated_device_goes_back_without_a_download(setup):
    setup.controller()
    setup.simulate(100, "--fail-install", "1.1.0:0.2")
    setup.online(100)
    setup.release(("1.0.0", "x86-64"))
    setup.release(("1.1.0", "x86-64"))
    rollout_id = setup.start("fleet@1.1.0", "--group", "all", "--stages", "30%,100%", "--soak", "0",
                             "--max-failures", "10", "--min-finished", "20")
    head = wait_for(lambda: (h := setup.show(rollout_id))["state"] == "aborted" and h, 180,
                    f"the abort\n{setup.log('controller-ctl')}")
    assert "failed" in head["reason"]
    wait_for(lambda: set(setup.active().values()) == {"1.0.0"}, 120, "every device back on 1.0.0")
    # A device never moved off 1.0.0 is "back" at once; the controller marks it rolled back only once
    # it reports the rollback's desired state: wait for that, not only for the versions.
    head = wait_for(lambda: (h := setup.show(rollout_id))["counts"].get("rollback_offered", 0) == 0 and h, 120,
                    f"every rollback reported\n{setup.log('controller-ctl')}")
    offered = _offers(setup.registry, rollout_id)
    assert len(offered) == 30 and set(offered.values()) == {1}  # nothing offered after the abort, nobody twice
    back = [m["device"] for m in head["members"] if m["status"] == "rolled_back"]
    assert back, head["counts"]
    steps = _update_steps(setup.registry, "1.0.0")
    # from the slot each still holds: re-activated, never downloaded again
    assert all("reactivate" in steps.get(d, set()) and "download" not in steps.get(d, set()) for d in back), \
        {d: steps.get(d) for d in back[:3]}
    failures = head["verdicts"]["failures"]
    assert failures["finished"] >= 20 and failures["failure_pct"] >= 10
    listed = setup.cli("rollouts").stdout
    assert f"{rollout_id}: fleet@1.1.0 aborted" in listed


def test_a_release_that_shifts_predictions_is_stopped_at_its_first_stage_by_the_metric_gate(setup):
    # It installs and serves fine on every device (no device can tell): only the fleet, comparing the
    # new cohort's predicted classes with the old one's, sees it.
    setup.controller()
    setup.simulate(20, "--metrics", "1.1.0:classes=0.8/0.1/0.1")
    setup.online(20)
    setup.release(("1.0.0", "x86-64"))
    setup.release(("1.1.0", "x86-64"))
    rollout_id = setup.start("fleet@1.1.0", "--group", "all", "--stages", "20%,100%", "--soak", "10s",
                             "--max-prediction-psi", "0.2", "--min-requests", "100", "--window", "5m")
    head = wait_for(lambda: (h := setup.show(rollout_id))["state"] != "running" and h, 180, "the metric verdict")
    assert head["state"] == "aborted" and "prediction_psi" in head["reason"], head["reason"]
    verdict = head["verdicts"]["metrics"]["profiles"]["x86-64"]
    assert verdict["prediction_psi"] > 0.2 and verdict["new"]["requests"] >= 100 and verdict["old"]["requests"] >= 100
    assert len(_offers(setup.registry, rollout_id)) == 4  # the first stage only
    shown = setup.cli("rollout", "show", str(rollout_id)).stdout
    assert "prediction_psi" in shown and "abort" in shown
    wait_for(lambda: set(setup.active().values()) == {"1.0.0"}, 90, "the first stage rolled back")


def test_offline_device_and_other_profile_converge_and_a_killed_controller_resumes(setup, fleet_bundles, tmp_path):
    from converters.pipeline import ConvertOptions, convert

    (rpi,) = convert(ConvertOptions(model="tests.models:fleet_good", profiles=["rpi4"], out=tmp_path / "rpi4",
                                    calibration=str(fleet_bundles["folder"] / "calib.npy"), input_shapes={"input": [1, 8]},
                                    name="fleet", version="1.0.0", recipes=["onnx-fp32"], signing_key=fleet_bundles["private"]))
    setup.bundles = {**fleet_bundles, "bundles": {**fleet_bundles["bundles"], ("1.0.0", "rpi4"): rpi.bundle}}
    controller = setup.controller()
    setup.simulate(12, "--offline", "sim-0003:0:45", profiles="x86-64,rpi4",
                   installs=[setup.bundles["bundles"][("1.0.0", "x86-64")], rpi.bundle])
    setup.online(11)
    setup.release(("1.0.0", "x86-64"), ("1.0.0", "rpi4"))
    setup.release(("1.1.0", "x86-64"), ("1.1.0", "rpi4"))
    rollout_id = setup.start("fleet@1.1.0", "--group", "all", "--stages", "50%,100%", "--soak", "3s")
    wait_for(lambda: len(_offers(setup.registry, rollout_id)) >= 6, 60, "the first stage offered")
    controller.send_signal(signal.SIGKILL)  # mid-rollout
    controller.wait(10)
    setup.controller()
    wait_for(lambda: setup.show(rollout_id)["state"] == "done", 180, f"the rollout done\n{setup.log('controller-ctl')}")
    wait_for(lambda: setup.active().get("sim-0003") == "1.1.0", 120, "the offline device converging")
    active = setup.active()
    assert set(active.values()) == {"1.1.0"}, active
    offers = _offers(setup.registry, rollout_id)
    assert len(offers) == 12 and set(offers.values()) == {1}  # nobody offered twice across the kill
    profiles = {r["device"]: r["profile"] for r in setup.registry.devices()}
    with setup.registry.engine.connect() as db:
        payloads = db.execute(select(desired.c.topic, desired.c.payload).where(desired.c.rollout == rollout_id)).all()
    for topic, payload in payloads:
        document = json.loads(json.loads(payload)["desired"])
        assert list(document["bundles"]) == [profiles[topic.split("/")[3]]]  # its own profile's bundle
    assert {profiles[d] for d in offers} == {"x86-64", "rpi4"}


def test_two_controllers_on_postgresql_share_a_fleet_and_one_dies_mid_rollout(tmp_path, fleet_bundles):
    from .postgres import Postgres

    database = Postgres()
    setup = Setup(tmp_path, fleet_bundles, db=database.url)
    try:
        first = setup.controller("c1", "--share", "chunks")
        setup.controller("c2", "--share", "chunks")
        setup.simulate(20)
        setup.online(20)
        setup.release(("1.0.0", "x86-64"))
        setup.release(("1.1.0", "x86-64"))
        rollout_id = setup.start("fleet@1.1.0", "--group", "all", "--stages", "25%,100%", "--soak", "3s")
        wait_for(lambda: _offers(setup.registry, rollout_id), 60, "the first offers")
        first.send_signal(signal.SIGKILL)  # whichever held the rollout lease, the other goes on
        first.wait(10)
        wait_for(lambda: setup.show(rollout_id)["state"] == "done", 180,
                 f"the rollout done\n{setup.log('controller-c2')}")
        wait_for(lambda: set(setup.active().values()) == {"1.1.0"}, 60, "every device on 1.1.0")
        offers = _offers(setup.registry, rollout_id)
        assert len(offers) == 20 and set(offers.values()) == {1}
        # Telemetry: both controllers store it (plain subscriptions), each message once, none missing
        # (a device's seq numbers have no gaps up to the last one stored).
        time.sleep(3)
        with setup.registry.engine.connect() as db:
            rows = db.execute(select(messages.c.device, messages.c.boot, messages.c.seq)).all()
        assert len(rows) == len(set(rows))
        by_boot: dict[tuple, list[int]] = {}
        for device, boot, seq in rows:
            by_boot.setdefault((device, boot), []).append(seq)
        for key, seqs in by_boot.items():
            assert sorted(seqs) == list(range(1, max(seqs) + 1)), (key, sorted(set(range(1, max(seqs) + 1)) - set(seqs))[:5])
    finally:
        setup.close()
        database.stop()


def test_a_rollout_with_an_http_source_downloads_every_bundle_over_http(setup):
    """`fleet serve --http`: the offers name the controller's Range server as each bundle's source, every
    device downloads the whole bundle from it (its own event says how many bytes came over HTTP) and none
    over MQTT chunks, and the rollout finishes."""
    from .broker import free_port

    port = free_port()
    setup.controller("ctl", "--http", f"127.0.0.1:{port}")
    setup.simulate(6)
    setup.online(6)
    setup.release(("1.0.0", "x86-64"))
    setup.release(("1.1.0", "x86-64"))
    rollout_id = setup.start("fleet@1.1.0", "--group", "all", "--stages", "50%,100%", "--soak", "0")
    wait_for(lambda: setup.show(rollout_id)["state"] == "done", 120, f"the rollout done\n{setup.log('controller-ctl')}")
    assert set(setup.active().values()) == {"1.1.0"}
    size = Path(setup.bundles["bundles"][("1.1.0", "x86-64")]).stat().st_size
    with setup.registry.engine.connect() as db:
        payloads = [json.loads(json.loads(p)["desired"]) for (p,) in db.execute(
            select(desired.c.payload).where(desired.c.rollout == rollout_id)).all()]
        done = wait_for(lambda: db.execute(select(messages.c.device, messages.c.body)
                                           .where(messages.c.event == "download_source_done")).all()
                        if db.rollback() is None else None, 30, "every download's event")
    urls = {ref["url"] for p in payloads for ref in p["bundles"].values()}
    assert len(payloads) == 6 and len(urls) == 1 and urls.pop().startswith(f"http://127.0.0.1:{port}/bundles/")
    assert len({device for device, _ in done}) == 6 and all(body["bytes"] == size for _, body in done), done
    with setup.registry.engine.connect() as db:
        chunk_events = db.execute(select(func.count()).select_from(messages)
                                  .where(messages.c.event == "download_source_failed")).scalar()
    assert chunk_events == 0
