"""The fleet link under the faults a fleet of Raspberry Pis meets (issue 17): damaged files on the SD
card, a full disk, another process holding the store, a controller that never answers, a broker
without MQTT 5, hostile inference clients during probation, and an operator's local brake. Real
daemons, a real Mosquitto (and Aedes for MQTT 3.1.1), real files."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from agent.store import ModelStore

from ..conftest import ROOT, run_cli
from .test_fleet import DEVICE, Fleet, Probe, infer, wait_for


@pytest.fixture()
def make_fleet(tmp_path, fleet_bundles):
    made = []

    def make(**options) -> Fleet:
        fleet = Fleet(tmp_path / f"f{len(made)}", fleet_bundles, **options)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.close()


def _kinds(fleet, name):
    return [e for e in fleet.events(name)]


def test_damaged_spool_and_update_record_do_not_stop_the_daemon(make_fleet):
    fleet = make_fleet()
    (fleet.store / "spool.sqlite").write_bytes(b"\x00garbage after a power cut\xff" * 100)
    (fleet.store / "fleet").mkdir(parents=True, exist_ok=True)
    (fleet.store / "fleet" / "desired.json").write_bytes(b'{"accepted": {"edgepack/v1/de')  # torn write
    fleet.start_controller()
    agent = fleet.start_agent()
    # serving: a damaged spool is moved aside, not fatal (the first answer may be slow on a loaded host)
    wait_for(lambda: infer(agent.url)[0] == 200, 30, "an answer")
    reset = wait_for(lambda: _kinds(fleet, "spool_reset"), 20, "the spool_reset event")
    assert list(fleet.store.glob("spool.sqlite.corrupt-*")), reset
    wait_for(lambda: _kinds(fleet, "update_record_corrupt"), 20, "the update_record_corrupt event")
    # Fail closed: no desired state is taken while the anti-replay memory is unreadable.
    fleet.push("1.1.0")
    refused = wait_for(lambda: [e for e in _kinds(fleet, "desired_refused") if e["reason"] == "record-corrupt"], 20,
                       "the refusal")
    assert "reset-updates" in refused[0]["message"]
    time.sleep(1.0)
    assert fleet.active() == "1.0.0"
    status = run_cli("status", "--config", fleet.config, program="edgepack-agent")
    assert "updates refused" in status.stdout, status.stdout
    # The operator's act: the held desired state is taken at once, without another push.
    reset = run_cli("reset-updates", "--config", fleet.config, program="edgepack-agent")
    assert reset.returncode == 0 and "corrupt-" in reset.stdout, reset.stderr
    fleet.wait_commit("1.1.0")


SQLITE_FULL = """
import os, sys, time, errno, sqlite3
from agent.fleet import spool
from agent.cli import main
started = time.monotonic()
original_add = spool.Spool.add_many
def add_many(self, items):
    if time.monotonic() - started < {full_s}:
        raise sqlite3.OperationalError("database or disk is full")
    return original_add(self, items)
spool.Spool.add_many = add_many
real_pwrite = os.pwrite
def pwrite(fd, data, offset):
    if {full_s} <= time.monotonic() - started < {full_s} + {enospc_s}:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_pwrite(fd, data, offset)
os.pwrite = pwrite
"""


def test_full_disk_delays_telemetry_and_the_update_but_kills_nothing(make_fleet):
    fleet = make_fleet(interval_s=0.3)
    fleet.start_controller()
    # The spool's file is full for the first 4 s; then the download's writes fail for 3 s more.
    agent = fleet.start_agent(python_code=SQLITE_FULL.format(full_s=4.0, enospc_s=3.0))
    probe = Probe(fleet)
    probe.start()
    time.sleep(4.5)
    fleet.push("1.1.0")  # its chunk writes hit ENOSPC
    # after the disk frees up: the ticker is still alive, the update went on and committed
    wait_for(lambda: len(fleet.controller.registry.messages(DEVICE, "telemetry")) >= 3, 30, "telemetry again")
    fleet.wait_commit("1.1.0")
    seen = probe.stop()
    assert seen and all(status == 200 for status, _ in seen), [s for s in seen if s[0] != 200][:5]
    waiting = wait_for(lambda: [e for e in _kinds(fleet, "update_waiting") if e["reason"] == "disk-full"], 20,
                       "the disk-full event")
    assert "free some space" in waiting[0]["message"]
    record = json.loads((fleet.store / "fleet" / "desired.json").read_text())
    assert not record["failed"]  # a full disk is not the bundle's fault
    telemetry = fleet.controller.registry.messages(DEVICE, "telemetry")
    assert any(t["body"].get("unspooled") for t in telemetry)  # what could not be spooled is counted
    metrics = __import__("urllib.request").request.urlopen(f"{agent.url}/metrics").read().decode()
    assert 'edgepack_background_failures_total{task="spool"}' in metrics


LOCKER = """
import sys, time
from agent.store import ModelStore
store = ModelStore(sys.argv[1])
with store.locked():
    if sys.argv[3] == "install":  # what 'edgepack-agent install' looks like from outside: staging
        store.transition("fleet", "install", target={{"source": "elsewhere"}})
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    if sys.argv[3] == "install":
        store.transition("fleet", "fail", "the other install gave up")
"""


def _hold_lock(store, seconds: float, mode: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", LOCKER.format(), str(store), str(seconds), mode], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


class LatencyProbe(threading.Thread):
    """Health probes every 50 ms; the slowest answer (a frozen event loop shows here)."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.worst, self.failures, self.stopped = url, 0.0, 0, threading.Event()

    def run(self):
        import urllib.request

        while not self.stopped.is_set():
            began = time.monotonic()
            try:
                urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=5).read()
            except OSError:
                self.failures += 1
            self.worst = max(self.worst, time.monotonic() - began)
            time.sleep(0.05)

    def stop(self):
        self.stopped.set()
        self.join(10)
        return self.worst


def test_store_held_by_another_process_neither_freezes_nor_strands_the_update(make_fleet):
    fleet = make_fleet(probation_s=2.0)
    fleet.start_controller()
    agent = fleet.start_agent(env={"EDGEPACK_LOCK_WAIT_S": "1"})
    probe = LatencyProbe(agent.url)
    probe.start()
    # An install of the same model runs in another process while the desired state arrives.
    locker = _hold_lock(fleet.store, 6.0, "install")
    fleet.push("1.1.0")
    locker.wait(30)
    wait_for(lambda: fleet.update()["state"] == "probation", 60, "the probation")
    # The commit comes due while another process holds the store for longer than the lock wait: the
    # commit is retried until it happens (it used to be dropped, and probation stuck for ever).
    locker = _hold_lock(fleet.store, 4.0, "hold")
    locker.wait(30)
    fleet.wait_commit("1.1.0")
    worst = probe.stop()
    assert probe.failures == 0 and worst < 1.0, f"health probes waited up to {worst:.2f} s"
    assert wait_for(lambda: [e for e in _kinds(fleet, "update_delayed") if e["step"] == "commit"], 20, "the delay event")


def test_rollback_waits_out_a_held_store_and_the_old_version_serves(make_fleet):
    fleet = make_fleet(probation_s=30.0)
    fleet.start_controller()
    agent = fleet.start_agent(env={"EDGEPACK_LOCK_WAIT_S": "1"})
    fleet.push("1.2.0")  # NaN on negative inputs
    wait_for(lambda: fleet.update()["state"] == "probation", 60, "the probation")
    locker = _hold_lock(fleet.store, 4.0, "hold")
    for _ in range(10):
        infer(agent.url, -0.5)  # NaN: the verdict is a rollback, due while the store is held
    locker.wait(30)
    wait_for(lambda: fleet.update()["result"] == "rolled_back", 60, "the rollback")
    wait_for(lambda: infer(agent.url, 0.5)[1].get("model_version") == "1.0.0", 20, "the old version serving")
    assert [e for e in _kinds(fleet, "update_delayed") if e["step"] == "rollback"]


def test_a_download_that_cannot_finish_is_replaced_and_times_out(make_fleet):
    fleet = make_fleet(updates={"download_timeout_s": 5.0})
    fleet.start_controller()
    fleet.controller.serve_chunks = False  # a controller that never answers chunk requests
    fleet.start_agent()
    fleet.push("1.1.0")
    wait_for(lambda: fleet.update()["state"] == "downloading", 30, "the download")
    status = json.loads(run_cli("status", "--config", fleet.config, "--json", program="edgepack-agent").stdout)
    assert status["models"]["fleet"]["update"]["download"]["percent"] == 0.0
    fleet.push("1.3.0")  # a corrected push replaces the stuck download at once, no restart
    wait_for(lambda: fleet.update()["state"] == "downloading" and fleet.update()["target"]["version"] == "1.3.0", 30,
             "the replacement")
    failed = wait_for(lambda: json.loads((fleet.store / "fleet" / "desired.json").read_text())["failed"], 30,
                      "the download deadline")
    assert next(iter(failed.values()))["reason"] == "timeout"
    fleet.controller.serve_chunks = True
    fleet.wait_commit("1.3.0")  # tried again after its deadline; with no latency budget a slower one commits
    progress = _kinds(fleet, "download_progress")
    assert progress and progress[-1]["percent"] >= 90 and progress[0]["total_chunks"] >= 1


def test_overflowing_request_during_probation_does_not_veto_a_good_version(make_fleet):
    fleet = make_fleet(probation_s=3.0)
    fleet.start_controller()
    agent = fleet.start_agent()
    fleet.push("1.1.0")
    wait_for(lambda: fleet.update()["state"] == "probation", 60, "the probation")
    # The state file says probation a moment before the daemon has swapped: wait for 1.1.0 to answer.
    wait_for(lambda: infer(agent.url, 0.5)[1].get("model_version") == "1.1.0", 20, "1.1.0 serving")
    status, body = infer(agent.url, 3e38)  # finite, and far outside the calibration range: Inf out
    assert status in (200, 400)
    for _ in range(8):
        assert infer(agent.url, 0.5)[0] == 200
    fleet.wait_commit("1.1.0")
    assert "1 out-of-range runs left out" in fleet.update()["reason"], fleet.update()


def test_local_rollback_holds_until_the_fleet_sends_a_newer_desired_state(make_fleet):
    fleet = make_fleet(probation_s=1.0)
    fleet.start_controller()
    agent = fleet.start_agent()
    fleet.push("1.1.0")
    fleet.wait_commit("1.1.0")
    rolled = run_cli("rollback", "--config", fleet.config, program="edgepack-agent")
    assert rolled.returncode == 0, rolled.stderr
    wait_for(lambda: infer(agent.url)[1].get("model_version") == "1.0.0", 20, "the daemon serving 1.0.0")
    assert agent.stop() == 0
    agent = fleet.start_agent()  # the retained desired state still says 1.1.0: the brake holds
    time.sleep(3.0)
    assert fleet.active() == "1.0.0" and infer(agent.url)[1].get("model_version") == "1.0.0"
    device = wait_for(lambda: next((d for d in fleet.controller.registry.devices()
                                    if (d["state"] or {}).get("models", {}).get("fleet", {}).get("local")), None),
                      20, "the brake in the retained state")
    assert device["state"]["models"]["fleet"]["local"]["action"] == "rollback"
    fleet.push("1.1.0")  # a newer desired state: the fleet decides again
    fleet.wait_commit("1.1.0")


def test_clean_stop_during_probation_keeps_the_new_version_for_the_next_start(make_fleet):
    fleet = make_fleet(probation_s=6.0)
    fleet.start_controller()
    agent = fleet.start_agent()
    fleet.push("1.1.0")
    wait_for(lambda: fleet.update()["state"] == "probation", 60, "the probation")
    sent = fleet.controller.chunks_sent
    assert agent.stop() == 0  # SIGTERM: not the new version's fault
    state = ModelStore(fleet.store).state("fleet")
    assert fleet.active() == "1.0.0" and state["slots"][state["previous"]]["version"] == "1.1.0"
    fleet.start_agent()
    fleet.wait_commit("1.1.0")
    assert fleet.controller.chunks_sent == sent  # no second download
    steps = [h["event"] for h in fleet.update()["history"]]
    assert "reactivate" in steps and steps[-1] == "commit"


def test_mqtt_3_1_1_only_broker_agent_controller_and_push(tmp_path, fleet_bundles):
    from .aedes import AedesBroker

    aedes = AedesBroker(tmp_path / "aedes")
    fleet = Fleet(tmp_path, fleet_bundles, broker=aedes)
    try:
        fleet.start_controller()
        assert fleet.address.protocol == "3.1.1"  # auto fell back
        agent = fleet.start_agent()
        wait_for(lambda: fleet.controller.registry.devices(), 30, "the agent's state over MQTT 3.1.1")
        wait_for(lambda: fleet.controller.registry.messages(DEVICE, "telemetry"), 30, "telemetry")
        pushed = run_cli("fleet", "push", fleet_bundles["bundles"][("1.1.0", "x86-64")], "--device", DEVICE, "--key",
                         fleet_bundles["private"], "--broker", aedes.url, "--bundles", tmp_path / "shelf",
                         "--db", f"sqlite:///{tmp_path / 'push.db'}")
        assert pushed.returncode == 0, pushed.stderr
        fleet.wait_commit("1.1.0")
        listed = json.loads(run_cli("fleet", "devices", "--db", f"sqlite:///{tmp_path / 'fleet.db'}", "--json").stdout)
        assert listed[0]["device"] == DEVICE and listed[0]["online"]
        link = json.loads((fleet.store / "fleet" / "link.json").read_text())
        assert link["connected"] and link["protocol"] == "3.1.1"
        failed = [e for e in agent.logs if e.get("msg") == "mqtt connection failed"]
        assert failed and failed[0]["reason"] in ("refused", "no-connack") and failed[0]["protocol"] == "5", agent.lines[-10:]
    finally:
        fleet.close()
