"""The fleet controller against a real Mosquitto: telemetry acknowledged only once stored (a stop and a
kill -9 with a backlog lose nothing and store nothing twice), a Last Will that keeps what the device
runs, chunk requests authorised by desired states and rate-limited, releases that are immutable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgepack.bundle.signing import generate_keys, load_private_key
from edgepack.fleet import chunks, topics
from edgepack.fleet.controller import Broker as BrokerAddress
from edgepack.fleet.controller import FleetController
from edgepack.fleet.desired import (
    BundleRef,
    DesiredState,
    ModelRef,
    chunk_digests_of,
    sign_desired,
)
from edgepack.fleet.ingest import RETIRE_IDLE_S
from edgepack.fleet.registry import FleetRegistry

from ..conftest import run_cli
from .broker import Broker

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _client(broker: Broker, client_id: str):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return client


def _serve(broker: Broker, db: str, shelf: Path, workers: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgepack.cli", "fleet", "serve", "--broker", broker.url, "--db", db,
                             "--bundles", str(shelf), "--client-id", "controller-under-test",
                             "--ingest-workers", str(workers)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how,workers", [(signal.SIGTERM, 1), (signal.SIGKILL, 1), (signal.SIGTERM, 2),
                                         (signal.SIGKILL, 2)])
def test_a_controller_stopped_or_killed_with_a_backlog_stores_every_message_once(tmp_path, how, workers):
    """Also with ingest workers (processes in one MQTT 5 shared subscription): killed with the
    controller, they do not outlive it, and their sessions' backlog is stored once after the restart."""
    broker = Broker(tmp_path / "broker")
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    registry = FleetRegistry(db)
    controller = _serve(broker, db, tmp_path / "shelf", workers)
    device = _client(broker, "sender")
    try:
        # The controller is there once it stored a state.
        device.publish(topics.state("d0"), json.dumps({"online": True, "profile": "x86-64", "models": {}}), qos=1,
                       retain=True)
        wait_for(lambda: registry.device("d0"), 30, "the controller")
        sent = set()
        total = 1500
        stopped = threading.Event()

        def send():
            for seq in range(1, total + 1):
                if seq == 1001:
                    # The last third waits for the stop: a fast host once stored all 1500 during the
                    # workers' drain, and then no backlog was left for the restart to take.
                    stopped.wait(120)
                name = f"d{seq % 3}"
                body = {"schema": 1, "kind": "telemetry", "device": name, "boot": "b1", "seq": seq, "ts": time.time(),
                        "models": {"m": {"version": "1.0.0", "requests": {"ok": 5}, "latency_s": {"p95": 0.01}}}}
                info = device.publish(topics.telemetry(name), json.dumps(body), qos=1)
                info.wait_for_publish(10)
                sent.add((name, "b1", seq))

        sender = threading.Thread(target=send)
        sender.start()
        wait_for(lambda: registry.message_count() >= 300, 60, "a few hundred stored")
        spawned = _children(controller.pid)
        assert len(spawned) >= (workers if workers > 1 else 0)
        controller.send_signal(how)
        assert controller.wait(30) == (-how if how == signal.SIGKILL else 0), controller.stderr.read()[-2000:]
        # a worker drains for at most ingest.DRAIN_S after the stop, then exits anyway
        wait_for(lambda: not any(_alive(pid) for pid in spawned), 45, "the ingest workers to go with the controller")
        stored_at_stop = registry.message_count()
        stopped.set()
        sender.join(60)
        assert len(sent) == total
        controller = _serve(broker, db, tmp_path / "shelf", workers)  # the broker kept the rest for its session
        wait_for(lambda: registry.message_count() >= total, 90, "every message")
        time.sleep(1.0)
        rows = registry.messages(None, "telemetry", 10_000)
        keys = [(r["device"], r["boot"], r["seq"]) for r in rows]
        assert len(keys) == len(set(keys)) == total and set(keys) == sent
        assert stored_at_stop < total  # the stop really came with a backlog
        # rolled up per device, version and minute for the rollout gates: every request counted once
        from sqlalchemy import func, select

        from edgepack.fleet.db import rollups

        with registry.engine.connect() as conn:
            assert conn.execute(select(func.sum(rollups.c.requests))).scalar_one() == 5 * total
    finally:
        controller.send_signal(signal.SIGTERM)
        controller.wait(30)
        device.loop_stop()
        broker.stop()


@pytest.fixture()
def running(tmp_path):
    broker = Broker(tmp_path / "broker")
    controller = FleetController(BrokerAddress.from_url(broker.url), f"sqlite:///{tmp_path / 'fleet.db'}",
                                 tmp_path / "shelf", client_id="ctl", chunk_burst=4, chunk_rate=0.001)
    stop = threading.Event()
    thread = threading.Thread(target=controller.serve, args=(stop,), daemon=True)
    thread.start()
    assert controller.connected.wait(10)
    yield broker, controller, tmp_path
    stop.set()
    thread.join(10)
    broker.stop()


def test_a_last_will_keeps_what_the_device_runs(running):
    broker, controller, _ = running
    client = _client(broker, "dev")
    state = {"online": True, "profile": "rpi4", "groups": ["g"],
             "models": {"m": {"active": "1.1.0", "previous": "1.0.0", "update": {"state": "idle"}}}}
    client.publish(topics.state("dev"), json.dumps(state), qos=1, retain=True).wait_for_publish(5)
    wait_for(lambda: controller.registry.device("dev"), 10, "the state")
    client.publish(topics.state("dev"), json.dumps({"schema": 1, "device": "dev", "online": False}), qos=1,
                   retain=True).wait_for_publish(5)
    row = wait_for(lambda: (r := controller.registry.device("dev")) and not r["online"] and r, 10, "offline")
    assert row["profile"] == "rpi4" and row["state"]["models"]["m"]["active"] == "1.1.0"
    client.loop_stop()


def test_chunk_requests_are_authorised_by_desired_states_and_rate_limited(running, tmp_path):
    broker, controller, _ = running
    blob = tmp_path / "bundle.bin"
    blob.write_bytes(os.urandom(8 * chunks.CHUNK_BYTES))
    import hashlib

    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    controller.shelf.add(blob)
    assert controller.shelf.find(sha).name == f"{sha}.edgepack"  # stored by content
    received = []
    client = _client(broker, "dev")
    client.on_message = lambda c, u, m: received.append(chunks.decode_frame(m.payload)[0]["index"])
    client.subscribe(topics.chunk_data("dev"), qos=1)
    time.sleep(0.3)
    client.publish(topics.chunk_requests("dev"), chunks.request(sha, [0, 1, 2]), qos=1).wait_for_publish(5)
    wait_for(lambda: controller.chunks_refused, 10, "the refusal")
    time.sleep(0.5)
    assert received == []  # no desired state names that bundle for this device
    private, _ = generate_keys(tmp_path / "keys")
    now = time.time()
    state = DesiredState(version=1, device="dev", issued_at=now, expires_at=now + 60, model=ModelRef(name="m", version="1.0.0"),
                         bundles={"x86-64": BundleRef(sha256=sha, size=blob.stat().st_size, chunk_bytes=chunks.CHUNK_BYTES,
                                                      chunks=chunk_digests_of(blob, chunks.CHUNK_BYTES))})
    client.publish(topics.desired("dev"), sign_desired(state, load_private_key(private)), qos=1, retain=True).wait_for_publish(5)
    wait_for(lambda: sha in controller.wanted.get(topics.desired("dev"), ()), 10, "the desired state seen")
    client.publish(topics.chunk_requests("dev"), chunks.request(sha, list(range(8))), qos=1).wait_for_publish(5)
    wait_for(lambda: len(received) >= 4, 10, "the chunks")
    time.sleep(1.0)
    assert sorted(received) == [0, 1, 2, 3]  # a burst of 4; the rest is asked again later
    assert controller.chunks_dropped >= 4
    client.loop_stop()


def test_releases_are_registered_once_and_immutable(fleet_bundles, tmp_path):
    bundles = fleet_bundles["bundles"]
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    args = ["--db", db, "--bundles", tmp_path / "shelf"]
    added = run_cli("fleet", "release", "add", bundles[("1.1.0", "x86-64")], bundles[("1.1.0", "rpi4")], "--notes",
                    "faster", *args)
    assert added.returncode == 0 and "release fleet@1.1.0" in added.stdout, added.stderr
    again = run_cli("fleet", "release", "add", bundles[("1.1.0", "x86-64")], *args)
    assert again.returncode == 0, again.stderr
    rebuilt = tmp_path / "rebuilt.edgepack"  # the same version, other bytes (signed again with another key)
    shutil.copyfile(bundles[("1.1.0", "x86-64")], rebuilt)
    assert run_cli("sign", rebuilt, "--key", fleet_bundles["other"]).returncode == 0
    refused = run_cli("fleet", "release", "add", rebuilt, *args)
    assert refused.returncode == 2 and "immutable" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    mixed = run_cli("fleet", "release", "add", bundles[("1.0.0", "x86-64")], bundles[("1.1.0", "rpi4")], *args)
    assert mixed.returncode == 2 and "one model version" in mixed.stderr
    listed = json.loads(run_cli("fleet", "release", "list", "--json", "--db", db).stdout)
    assert [(r["name"], r["version"], sorted(r["bundles"])) for r in listed] == [("fleet", "1.1.0", ["rpi4", "x86-64"])]
    shelf = sorted(p.name for p in (tmp_path / "shelf").iterdir())
    assert len(shelf) == 2 and all(len(name) == 64 + len(".edgepack") for name in shelf)
    unknown = run_cli("fleet", "rollout", "start", "fleet@9.0.0", "--group", "g", "--db", db)
    assert unknown.returncode == 2 and "no release fleet@9.0.0" in unknown.stderr


def test_fewer_ingest_workers_drain_and_end_the_sessions_of_the_ones_gone(tmp_path):
    """Run with 2 ingest workers, stop, and start with 1 (the controller alone): what the broker queued
    for the two workers' sessions while it was away is stored, and those sessions are ended — Mosquitto
    would otherwise go on handing them a share of every later message, stored by nobody."""
    broker = Broker(tmp_path / "broker")
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    registry = FleetRegistry(db)
    device = _client(broker, "sender")

    def send(first, last):
        for seq in range(first, last + 1):
            body = {"schema": 1, "kind": "telemetry", "device": "d1", "boot": "b1", "seq": seq, "ts": time.time()}
            device.publish(topics.telemetry("d1"), json.dumps(body), qos=1).wait_for_publish(10)

    controller = _serve(broker, db, tmp_path / "shelf", 2)
    try:
        device.publish(topics.state("d1"), json.dumps({"online": True, "profile": "x86-64", "models": {}}), qos=1,
                       retain=True)
        wait_for(lambda: registry.device("d1"), 60, "the controller")
        send(1, 100)
        wait_for(lambda: registry.message_count() >= 100, 60, "the first hundred")
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(60) == 0, controller.stderr.read()[-2000:]
        send(101, 300)  # queued round-robin for the two workers' sessions
        controller = _serve(broker, db, tmp_path / "shelf", 1)
        wait_for(lambda: registry.message_count() >= 300, 60, "the backlog of the workers' sessions")
        time.sleep(RETIRE_IDLE_S + 3)  # the retiring workers end their sessions
        send(301, 400)  # all to the controller now: nothing goes to a session nobody reads
        wait_for(lambda: registry.message_count() >= 400, 60, "every later message")
        seqs = sorted(r["seq"] for r in registry.messages("d1", "telemetry", 10_000))
        assert seqs == list(range(1, 401))
    finally:
        controller.send_signal(signal.SIGTERM)
        controller.wait(60)
        device.loop_stop()
        broker.stop()
