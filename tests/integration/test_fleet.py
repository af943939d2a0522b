"""Agent <-> fleet over a real Mosquitto broker: signed updates end to end, refusals, rollbacks by the
probation window, kill -9 in every update state, and telemetry that survives a broker outage."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.store import ModelStore
from edgepack.bundle.signing import load_private_key
from edgepack.fleet import chunks, topics
from edgepack.fleet.controller import Broker as BrokerAddress
from edgepack.fleet.controller import FleetController, desired_for_bundles, publish_retained
from edgepack.fleet.desired import sign_desired

from ..conftest import run_cli
from .broker import Broker
from .daemon import Daemon

DEVICE = "dev1"


class Fleet:
    """A broker, a controller (in this process), and one agent daemon with an MQTT config."""

    def __init__(self, tmp: Path, setup: dict, probation_s: float = 2.0, interval_s: float = 0.5, broker=None,
                 updates: dict | None = None):
        self.tmp, self.setup = tmp, setup
        self.broker = broker or Broker(tmp / "broker")
        self.address = BrokerAddress.from_url(self.broker.url)
        self.store = tmp / "store"
        self.config = tmp / "agent.yaml"
        self.config.write_text(json.dumps({
            "device_id": DEVICE, "profile": "x86-64", "store": str(self.store),
            "trusted_keys": [str(setup["public"])], "fleet_keys": [str(setup["public"])],
            "mqtt": {"host": "127.0.0.1", "port": self.broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "telemetry": {"interval_s": interval_s},
            "updates": {"probation_s": probation_s, "min_runs": 5, "chunk_timeout_s": 2.0, **(updates or {})},
        }))
        installed = run_cli("install", setup["bundles"][("1.0.0", "x86-64")], "--config", self.config, program="edgepack-agent")
        assert installed.returncode == 0, installed.stderr
        self.controller = None
        self.agent = None
        self.versions = iter(range(1, 1_000_000))

    def start_controller(self) -> None:
        self.stop_event = threading.Event()
        self.controller = FleetController(self.address, f"sqlite:///{self.tmp / 'fleet.db'}", self.tmp / "shelf")
        self.thread = threading.Thread(target=self.controller.serve, args=(self.stop_event,), daemon=True)
        self.thread.start()
        assert self.controller.connected.wait(10)

    def stop_controller(self) -> None:
        self.stop_event.set()
        self.thread.join(10)

    def start_agent(self, python_code: str | None = None, env: dict | None = None) -> Daemon:
        args = ["--config", self.config]
        if python_code:
            self.agent = Daemon(python_code=python_code + f"\nsys.argv=['edgepack-agent','run','--port','0','--config',{str(self.config)!r}]\nmain()\n",
                                env=env)
        else:
            self.agent = Daemon(*args, env=env)
        return self.agent

    def push(self, version: str, profile: str = "x86-64", desired_version: int | None = None, key=None,
             expires_s: float = 3600, raw: bytes | None = None, probation: dict | None = None,
             shadow: str | None = None) -> None:
        bundle = self.setup["bundles"][(version, profile)]
        shadow_bundle = self.setup["bundles"][(shadow, profile)] if shadow else None
        if self.controller:
            self.controller.shelf.add(bundle)
            if shadow_bundle:
                self.controller.shelf.add(shadow_bundle)
        if desired_version is None:
            desired_version = 100 + next(self.versions)
        payload = raw or sign_desired(desired_for_bundles([bundle], device=DEVICE, group=None, version=desired_version,
                                                          expires_s=expires_s, probation=probation,
                                                          shadow=[shadow_bundle] if shadow_bundle else None),
                                      load_private_key(key or self.setup["private"]))
        publish_retained(self.address, topics.desired(DEVICE), payload, f"pusher-{time.monotonic_ns()}")

    def wait_commit(self, version: str, timeout: float = 60) -> None:
        """Wait for ``version`` committed; on time-out the agent's log tail goes into the failure."""
        try:
            wait_for(lambda: self.active() == version and self.update()["result"] == "committed", timeout, "the commit")
        except AssertionError:
            tail = "\n".join(line[:300] for line in (self.agent.lines[-25:] if self.agent else []))
            raise AssertionError(f"{version} not committed; update {json.dumps(self.update())[-1500:]}\n{tail}") from None

    def active(self) -> str | None:
        state = ModelStore(self.store).state("fleet")
        return state["slots"].get(state.get("active") or "", {}).get("version")

    def update(self) -> dict:
        return ModelStore(self.store).state("fleet")["update"]

    def events(self, name: str | None = None) -> list[dict]:
        rows = self.controller.registry.messages(DEVICE, "event", 10_000)
        return [r["body"] for r in rows if name is None or r["event"] == name]

    def close(self) -> None:
        if self.agent:
            self.agent.stop(signal.SIGKILL if self.agent.process.poll() is None else signal.SIGTERM)
        if self.controller:
            self.stop_controller()
        self.broker.stop()


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def infer(url: str, value: float | list = 0.5, count: int = 1) -> tuple[int, dict]:
    data = value if isinstance(value, list) else [value] * (8 * count)
    body = json.dumps({"inputs": [{"name": "input", "shape": [count, 8], "datatype": "FP32", "data": data}]}).encode()
    request = urllib.request.Request(f"{url}/v2/models/fleet/infer", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (OSError, http.client.HTTPException, ValueError):
        # Refused, reset, cut mid-body (IncompleteRead is no OSError) or a partial JSON body: an agent
        # killed with a request in flight. Status 0, never an exception that would end a Probe's thread.
        return 0, {}


class Probe(threading.Thread):
    """Calls the HTTP API every 100 ms; records (status, version)."""

    def __init__(self, fleet: Fleet, value: float = 0.5):
        super().__init__(daemon=True)
        self.fleet, self.value, self.seen, self.stopped = fleet, value, [], threading.Event()
        self.error: Exception | None = None
        self.trail: list = []  # (url, started, seconds) of each call, for a failure's message

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                url, began = self.fleet.agent.url, time.monotonic()
                status, body = infer(url, self.value)
                self.seen.append((status, body.get("model_version")))
                self.trail.append((url, round(began, 2), round(time.monotonic() - began, 3)))
                time.sleep(0.1)
        except Exception as exc:  # a dead probe would leave a stale last status: the test says why instead
            self.error = exc

    def runs(self) -> list:
        """(url, status, calls, first start, longest call) for each run of calls alike: a failure's story."""
        runs: list = []
        for (status, _), (url, began, took) in zip(self.seen, self.trail):
            if runs and runs[-1][:2] == [url, status]:
                runs[-1][2] += 1
                runs[-1][4] = max(runs[-1][4], took)
            else:
                runs.append([url, status, 1, began, took])
        return runs

    def wait_answered(self, url: str, count: int = 3, timeout: float = 15) -> None:
        """Wait for ``count`` answers (200) from ``url``: a restarted agent can be through a test's checks
        before this probe, calling every 100 ms, has called it at all (its last status would still be the
        killed one's refusal)."""
        wait_for(lambda: sum(1 for (status, _), (called, _, _) in zip(list(self.seen), list(self.trail))
                             if called == url and status == 200) >= count, timeout, f"{count} probe answers from {url}")

    def stop(self) -> list:
        self.stopped.set()
        self.join(15)
        assert not self.is_alive(), "the probe's last request did not end"
        if self.error:
            raise AssertionError(f"the probe stopped early: {self.error!r}")
        return self.seen


@pytest.fixture()
def fleet(tmp_path, fleet_bundles):
    setup = Fleet(tmp_path, fleet_bundles)
    yield setup
    setup.close()


def test_signed_update_commits_with_no_failed_request(fleet):
    fleet.start_controller()
    agent = fleet.start_agent()
    probe = Probe(fleet)
    probe.start()
    wait_for(lambda: fleet.controller.registry.devices(), 30, "the agent online")
    # The operator's commands, as real processes.
    pushed = run_cli("fleet", "push", fleet.setup["bundles"][("1.1.0", "x86-64")], "--device", DEVICE, "--key",
                     fleet.setup["private"], "--broker", fleet.broker.url, "--bundles", fleet.tmp / "shelf",
                     "--db", f"sqlite:///{fleet.tmp / 'fleet.db'}")
    assert pushed.returncode == 0 and "fleet 1.1.0 (x86-64)" in pushed.stdout, pushed.stderr
    fleet.wait_commit("1.1.0")
    devices = json.loads(run_cli("fleet", "devices", "--db", f"sqlite:///{fleet.tmp / 'fleet.db'}", "--json").stdout)
    assert devices[0]["device"] == DEVICE
    listed = run_cli("fleet", "events", "--db", f"sqlite:///{fleet.tmp / 'fleet.db'}", "--device", DEVICE)
    assert "desired_accepted" in listed.stdout, listed.stdout
    time.sleep(0.5)
    seen = probe.stop()
    assert seen and all(status == 200 for status, _ in seen), [s for s in seen if s[0] != 200][:5]
    assert {version for _, version in seen} <= {"1.0.0", "1.1.0"} and seen[-1][1] == "1.1.0"
    wait_for(lambda: any(e["step"] == "commit" for e in fleet.events("update")), 10, "the commit event")
    steps = [(e["from"], e["to"]) for e in fleet.events("update")]
    assert steps[-5:] == [("idle", "downloading"), ("downloading", "staging"), ("staging", "switching"),
                          ("switching", "probation"), ("probation", "idle")]
    device = wait_for(lambda: next((d for d in fleet.controller.registry.devices()
                                    if (d["state"] or {}).get("models", {}).get("fleet", {}).get("active") == "1.1.0"), None),
                      10, "the retained state to say 1.1.0")
    assert device["online"] and device["state"]["models"]["fleet"]["update"]["result"] == "committed"
    telemetry = fleet.controller.registry.messages(DEVICE, "telemetry")
    assert telemetry and "system" in telemetry[-1]["body"]
    assert agent.stop() == 0
    # the Last Will / clean stop leaves the retained state offline
    wait_for(lambda: not fleet.controller.registry.devices()[0]["online"], 10, "offline state")


def _refusal(fleet, reason: str) -> dict:
    return wait_for(lambda: next((e for e in fleet.events("desired_refused") if e["reason"] == reason), None), 20,
                    f"a refusal for {reason}")


def test_forged_expired_replayed_and_foreign_desired_states_are_refused(fleet, fleet_bundles):
    fleet.start_controller()
    fleet.start_agent()
    bundle = fleet_bundles["bundles"][("1.1.0", "x86-64")]
    state = desired_for_bundles([bundle], device=DEVICE, group=None, version=10, expires_s=3600)
    envelope = json.loads(sign_desired(state, load_private_key(fleet_bundles["private"])))
    unsigned = json.dumps({**envelope, "signatures": {}}).encode()
    fleet.push("1.1.0", raw=unsigned)
    _refusal(fleet, "unsigned")
    fleet.push("1.1.0", key=fleet_bundles["other"], desired_version=11)
    _refusal(fleet, "untrusted")
    tampered = json.dumps({**envelope, "desired": envelope["desired"].replace('"version":10', '"version":12')}).encode()
    fleet.push("1.1.0", raw=tampered)
    _refusal(fleet, "bad-signature")
    fleet.push("1.1.0", profile="rpi4", desired_version=14)
    _refusal(fleet, "profile")
    # a group's desired state (validly signed) replayed on the device's own topic
    group_state = desired_for_bundles([bundle], device=None, group="all", version=15, expires_s=3600)
    fleet.push("1.1.0", raw=sign_desired(group_state, load_private_key(fleet_bundles["private"])))
    _refusal(fleet, "wrong-device")
    assert fleet.active() == "1.0.0"
    # a valid one is taken; an older one replayed afterwards is refused, also after a restart
    fleet.push("1.1.0", desired_version=20)
    fleet.wait_commit("1.1.0")
    fleet.push("1.0.0", desired_version=19)
    _refusal(fleet, "replayed")
    fleet.agent.stop(signal.SIGKILL)
    before = len(fleet.events("desired_refused"))
    fleet.start_agent()  # the retained desired state is the replayed version 19
    wait_for(lambda: len(fleet.events("desired_refused")) > before, 20, "the retained replay refused")
    assert fleet.events("desired_refused")[-1]["reason"] == "replayed"
    assert fleet.active() == "1.1.0"


def test_expired_desired_state_is_refused(fleet, fleet_bundles):
    fleet.start_controller()
    fleet.start_agent()
    bundle = fleet_bundles["bundles"][("1.1.0", "x86-64")]
    state = desired_for_bundles([bundle], device=DEVICE, group=None, version=5, expires_s=3600)
    state = state.model_copy(update={"issued_at": time.time() - 7200, "expires_at": time.time() - 60})
    fleet.push("1.1.0", raw=sign_desired(state, load_private_key(fleet_bundles["private"])))
    assert "expired" in _refusal(fleet, "expired")["message"]
    assert fleet.active() == "1.0.0"


class EvilFleet(threading.Thread):
    """A second, real MQTT client that answers every chunk request with forged frames (their own header
    hashes match, so only the signed chunk list can tell them apart)."""

    def __init__(self, address, bundle: Path, damage):
        super().__init__(daemon=True)
        self.data = damage(bytearray(bundle.read_bytes()))
        self.sent = 0
        self.client = address.client("evil")
        self.client.on_message = self.on_message
        self.client.connect(address.host, address.port)
        self.client.subscribe(topics.chunk_requests(DEVICE), 1)
        self.client.loop_start()

    def on_message(self, client, userdata, message) -> None:
        sha256, indexes = chunks.parse_request(message.payload)
        for index in indexes:
            part = bytes(self.data[index * chunks.CHUNK_BYTES:(index + 1) * chunks.CHUNK_BYTES])
            if part:
                client.publish(topics.chunk_data(DEVICE), chunks.encode_frame(sha256, index, part), qos=1)
                self.sent += 1
        extra = len(self.data) // chunks.CHUNK_BYTES + 1  # and a chunk beyond the end, every time
        client.publish(topics.chunk_data(DEVICE), chunks.encode_frame(sha256, extra, b"x" * chunks.CHUNK_BYTES), qos=1)
        client.publish(topics.chunk_data(DEVICE), chunks.encode_frame(sha256, -1, b"x"), qos=1)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _flip(offset_fraction):
    def damage(data):
        data[int(len(data) * offset_fraction)] ^= 0x40
        return data
    return damage


@pytest.mark.parametrize("name,damage", [
    ("flip-early", _flip(0.05)), ("flip-last", _flip(0.999)), ("truncated", lambda d: d[:-10]),
    ("oversized", lambda d: d + bytes(3 * chunks.CHUNK_BYTES)),
])
def test_forged_chunk_frames_on_every_request_do_not_block_the_update(fleet, fleet_bundles, name, damage):
    bundle = fleet_bundles["bundles"][("1.1.0", "x86-64")]
    evil = EvilFleet(fleet.address, bundle, damage)  # answers every request before or beside the real one
    fleet.start_controller()
    fleet.start_agent()
    try:
        # First the forged frames are the only answers (the controller's shelf lacks the bundle, so it
        # stays silent): which of two publishers answers first is a race, and a download the real frames
        # finished would never see the forged ones. Then the real controller can answer too.
        controller, fleet.controller = fleet.controller, None
        fleet.push("1.1.0")
        fleet.controller = controller
        refused = wait_for(lambda: fleet.events("chunk_refused"), 30, "the refused frames reported")
        fleet.controller.shelf.add(bundle)
        fleet.wait_commit("1.1.0")
    finally:
        evil.stop()
    assert evil.sent > 0
    refused = fleet.events("chunk_refused")
    assert any("signed" in e["message"] for e in refused), refused[:3]
    record = json.loads((fleet.store / "fleet" / "desired.json").read_text())
    assert not record["failed"]  # forged frames cost no attempt
    assert infer(fleet.agent.url)[0] == 200


@pytest.mark.parametrize("version,reason,value,budget", [("1.2.0", "nonfinite", -0.5, None),
                                                        ("1.3.0", "latency", 0.5, {"max_latency_ratio": 3.0})])
def test_bad_new_model_is_rolled_back_by_probation(fleet, version, reason, value, budget):
    fleet.start_controller()
    fleet.start_agent()
    probe = Probe(fleet, value)
    probe.start()
    fleet.push(version, probation=budget)  # the slow one: its signed budget allows 3x the old time
    wait_for(lambda: fleet.update()["result"] == "rolled_back", 90, "the rollback")
    wait_for(lambda: infer(fleet.agent.url, value)[1].get("model_version") == "1.0.0", 30, "the old version serving")
    seen = probe.stop()
    assert fleet.active() == "1.0.0"
    assert reason in json.dumps(fleet.update()), fleet.update()
    assert all(status == 200 for status, _ in seen)
    events = wait_for(lambda: [e for e in fleet.events("update") if e["step"] == "rolled_back"], 10, "the event")
    assert events[-1]["to"] == "idle" and reason in events[-1]["reason"]


KILLER = """
import os, signal, sys
from agent.store import ModelStore
from agent.cli import main
original = ModelStore.transition
def transition(self, name, event, *args, **kwargs):
    state = original(self, name, event, *args, **kwargs)
    if state["update"]["state"] == {state!r} and event != "install":
        os.kill(os.getpid(), signal.SIGKILL)
    return state
ModelStore.transition = transition
"""


@pytest.mark.parametrize("state", ["downloading", "staging", "switching", "probation", "rolling_back"])
def test_kill_9_of_the_agent_in_every_update_state(fleet, state):
    fleet.start_controller()
    bad = state == "rolling_back"  # NaN outputs make probation roll back; the kill follows that write
    fleet.start_agent(python_code=KILLER.format(state=state))
    probe = Probe(fleet, -0.5 if bad else 0.5)  # every 100 ms, through the kill and the restart
    probe.start()
    fleet.push("1.2.0" if bad else "1.1.0")
    assert fleet.agent.process.wait(90) == -signal.SIGKILL
    fleet.start_agent()
    if state in ("downloading", "staging", "switching"):
        expected = "1.1.0"  # the update starts again (only missing chunks) and commits
    else:
        expected = "1.0.0"  # killed while the new version was on probation: it counts as a failure
    wait_for(lambda: fleet.active() == expected and fleet.update()["state"] == "idle", 90, f"version {expected}")
    probe.wait_answered(fleet.agent.url)
    seen = probe.stop()
    # No request failed except while the process was down (connection refused: status 0).
    assert {status for status, _ in seen} <= {0, 200}, [s for s in seen if s[0] not in (0, 200)][:5]
    assert seen[-1][0] == 200
    store = ModelStore(fleet.store)
    assert store.slot_health("fleet", store.state("fleet")["active"]) == "ok"
    wait_for(lambda: any((d["state"] or {}).get("models", {}).get("fleet", {}).get("active") == expected
                         for d in fleet.controller.registry.devices()), 20, "the retained state")


def test_telemetry_survives_broker_outage_and_agent_kill(fleet):
    fleet.config.write_text(fleet.config.read_text().replace('"interval_s": 0.5', '"interval_s": 0.05'))
    fleet.start_controller()
    fleet.start_agent()
    wait_for(lambda: len(fleet.controller.registry.messages(DEVICE, "telemetry")) > 5, 30, "telemetry")
    fleet.broker.stop()  # a 30 s outage at 20 messages/s, the agent killed in the middle of it
    outage = time.monotonic()
    time.sleep(14)
    fleet.agent.stop(signal.SIGKILL)  # the spool holds what the broker did not acknowledge
    fleet.start_agent()
    time.sleep(max(0.0, 30 - (time.monotonic() - outage)))
    fleet.broker.start()
    spool = fleet.store / "spool.sqlite"

    def drained():
        import sqlite3

        with sqlite3.connect(spool) as db:
            pending = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            last = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0]
        return pending == 0 and last

    last = wait_for(drained, 60, "the spool to drain")
    # The broker has everything; the controller (reconnecting with its own backoff) gets it from its
    # persistent session.
    wait_for(lambda: len(fleet.controller.registry.messages(DEVICE, None, 100_000)) >= last, 60, "every message")
    rows = fleet.controller.registry.messages(DEVICE, None, 100_000)
    seqs = sorted(r["seq"] for r in rows)
    assert seqs == list(range(1, seqs[-1] + 1)), "a sequence number is missing"
    assert fleet.controller.registry.duplicates >= 0
    assert len(seqs) > 400  # ~20 messages/s through the 30 s outage


def test_drift_scores_in_metrics_telemetry_and_an_event(fleet):
    fleet.start_controller()
    agent = fleet.start_agent()
    rng = np.random.default_rng(1)
    for _ in range(100):  # like the calibration data (uniform 0.1..1), 4 samples a request
        assert infer(agent.url, rng.uniform(0.1, 1.0, 32).tolist(), 4)[0] == 200
    time.sleep(1.5)
    assert not fleet.events("drift"), fleet.events("drift")
    sent = 100

    def shifted_until_drift():
        # far outside it; on a loaded host drift observes a subsample of runs (its cost budget), so
        # the shifted traffic goes on until the verdict comes
        nonlocal sent
        for _ in range(20):
            assert infer(agent.url, rng.uniform(5.0, 9.0, 32).tolist(), 4)[0] == 200
            sent += 1
        return next((e for e in fleet.events("drift") if e["score"] == "input:input"), None)

    # the input's score crosses (the predictions' may cross first: they shift too)
    event = wait_for(shifted_until_drift, 90, "an input drift event")
    # which test fired, on which feature, with its numbers
    assert event["test"] == "ks" and event["feature"].startswith("feature[") and event["p"] < event["alpha"]
    assert event["window_samples"] >= 50 and event["false_alarm_rate"] == 0.01
    metrics = urllib.request.urlopen(f"{agent.url}/metrics").read().decode()
    assert 'edgepack_drift_p_value{model="fleet",score="input:input"}' in metrics
    assert 'edgepack_drift_psi{model="fleet",score="input:input"}' in metrics
    wait_for(lambda: [t for t in fleet.controller.registry.messages(DEVICE, "telemetry")
                      if (((t["body"]["models"].get("fleet", {}).get("drift") or {}).get("tests") or {})
                          .get("input:input") or {}).get("alarm")],
             10, "the drift verdict in telemetry")

    def counted():
        rows = fleet.controller.registry.messages(DEVICE, "telemetry", 10_000)
        return sum(sum((t["body"]["models"].get("fleet", {}).get("predictions") or {}).values()) for t in rows)

    # every row's predicted class counted once, for the rollout gate's comparison of versions
    wait_for(lambda: counted() == 4 * sent, 10, f"the predicted classes in telemetry ({counted()} of {4 * sent})")


def _grpc_request(body: dict) -> bytes:
    """The OIP JSON ``body`` as a serialized ModelInferRequest (typed contents, as the JSON's data)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="fleet", id=str(body.get("id", "")))
    for item in body["inputs"]:
        tensor = request.inputs.add(name=item["name"], datatype=item["datatype"], shape=item["shape"])
        field = {"FP32": "fp32_contents", "INT64": "int64_contents"}[item["datatype"]]
        getattr(tensor.contents, field).extend(float(v) if item["datatype"] == "FP32" else v for v in item["data"])
    timeout = body.get("parameters", {}).get("timeout")
    if timeout is not None:
        request.parameters["timeout"].int64_param = min(timeout, 2**63 - 1)
    return request.SerializeToString()


def test_the_four_doors_are_one_dataplane(fleet):
    """The same requests over MQTT, HTTP JSON, HTTP binary and gRPC: identical outputs, and the same
    error class (HTTP status, the stream's ``code``, the gRPC status) for each hostile input."""
    import grpc

    from agent.serving.dataplane import ServiceError

    config = json.loads(fleet.config.read_text())
    config["server"] = {**config.get("server", {}), "grpc_port": 0}
    config["models"] = [{"name": "fleet", "stream": True, "stream_max_in_flight": 16, "max_samples_per_request": 64}]
    fleet.config.write_text(json.dumps(config))
    agent = fleet.start_agent()
    answers: dict = {}
    client = fleet.address.client("stream-client")
    qos_of: dict = {}

    def on_message(c, u, m):
        answer = json.loads(m.payload)
        answers.setdefault(answer.get("id"), answer)
        qos_of.setdefault(answer.get("id"), m.qos)

    client.on_message = on_message
    client.connect(fleet.address.host, fleet.address.port)
    client.subscribe(topics.stream(DEVICE, "fleet", "out"), 1)  # QoS 1: the answer arrives at the agent's QoS
    client.loop_start()

    def tensor(shape, data, datatype="FP32"):
        return {"name": "input", "shape": shape, "datatype": datatype, "data": data}

    hostile = {
        "bad-shape": {"inputs": [tensor([1, 3], [1, 2, 3])]},
        "nan": {"inputs": [tensor([1, 8], ["NaN"] * 8)]},
        "wrong-type": {"inputs": [tensor([1, 8], [1] * 8, "INT64")]},
        "no-inputs": {"inputs": []},
        "too-many": {"inputs": [tensor([65, 8], [0.5] * 65 * 8)]},
        "short-data": {"inputs": [tensor([2, 8], [0.5] * 15)]},
        "absurd-timeout": {"inputs": [tensor([1, 8], [0.5] * 8)], "parameters": {"timeout": 10 ** 400}},
    }
    good = {"id": "ok-1", "inputs": [tensor([2, 8], [0.5] * 16)]}
    try:
        time.sleep(1.0)
        topic = topics.stream(DEVICE, "fleet", "in")
        client.publish(topic, json.dumps(good), qos=1)
        client.publish(topic, json.dumps({**good, "id": "ok-qos0"}), qos=0)
        client.publish(topic, b"{not json", qos=1)
        for key, body in hostile.items():
            client.publish(topic, json.dumps({"id": key, **body}), qos=1)
        client.publish(topic, json.dumps({"id": "nan-qos0", **hostile["nan"]}), qos=0)
        wait_for(lambda: {"ok-1", "ok-qos0", "nan-qos0", None, *hostile} <= set(answers), 20, "every answer")
    finally:
        client.loop_stop()
        client.disconnect()
    url = f"{agent.url}/v2/models/fleet/infer"
    over_http = httpx.post(url, content=json.dumps(good), timeout=10).json()
    binary = np.full((2, 8), 0.5, np.float32)
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32",
                                      "parameters": {"binary_data_size": binary.nbytes}}],
                         "outputs": [{"name": over_http["outputs"][0]["name"], "parameters": {"binary_data": True}}]}).encode()
    raw = httpx.post(url, content=header + binary.tobytes(), timeout=10,
                     headers={"Inference-Header-Content-Length": str(len(header))})
    length = int(raw.headers["inference-header-content-length"])
    from_binary = np.frombuffer(raw.content[length:], np.float32)
    streamed = np.asarray(answers["ok-1"]["outputs"][0]["data"], np.float32)
    assert answers["ok-1"]["outputs"][0]["shape"] == [2, 4]
    # every answer (or error) at the QoS its request came with
    assert answers["ok-qos0"]["outputs"] == answers["ok-1"]["outputs"] and answers["nan-qos0"]["code"] == 400
    assert qos_of["ok-1"] == qos_of["nan"] == 1 and qos_of["ok-qos0"] == qos_of["nan-qos0"] == 0, qos_of
    assert np.array_equal(streamed, np.asarray(over_http["outputs"][0]["data"], np.float32))
    assert np.array_equal(streamed, from_binary)
    assert answers[None]["code"] == httpx.post(url, content=b"{not json", timeout=10).status_code == 400
    for key, body in hostile.items():
        status = httpx.post(url, content=json.dumps(body), timeout=10).status_code
        assert answers[key]["code"] == status and status in (400, 413), (key, answers[key], status)
    assert answers["too-many"]["code"] == 413
    # gRPC: the same answer, and the gRPC code of each error class
    status_of = {cls.grpc: cls.status for cls in ServiceError.__subclasses__() if cls.grpc != "DEADLINE_EXCEEDED"}
    with grpc.insecure_channel(agent.grpc_address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        from tritonclient.grpc import service_pb2

        response = service_pb2.ModelInferResponse.FromString(call(_grpc_request(good), timeout=10))
        assert response.id == "ok-1" and list(response.outputs[0].shape) == [2, 4]
        assert np.array_equal(np.frombuffer(response.raw_output_contents[0], np.float32), streamed)
        for key, body in [(None, b"{not json"), *hostile.items()]:
            with pytest.raises(grpc.RpcError) as refused:
                call(body if isinstance(body, bytes) else _grpc_request(body), timeout=10)
            assert status_of[refused.value.code().name] == answers[key]["code"], (key, refused.value.details())
    assert agent.process.poll() is None and infer(agent.url)[0] == 200


ACL = """
user edgepack-fleet
topic readwrite edgepack/#

pattern write edgepack/v1/devices/%u/state
pattern write edgepack/v1/devices/%u/telemetry
pattern write edgepack/v1/devices/%u/events
pattern write edgepack/v1/devices/%u/chunks/req
pattern read edgepack/v1/devices/%u/desired
pattern read edgepack/v1/devices/%u/chunks/data
pattern read edgepack/v1/groups/+/desired
pattern readwrite edgepack/v1/devices/%u/stream/#
"""


def test_tls_client_certificates_and_acl_keep_devices_to_their_own_topics(tmp_path, fleet_bundles):
    from .tls import certificate_authority

    certs = certificate_authority(tmp_path / "pki", ["server", DEVICE, "dev2", "edgepack-fleet"])
    (tmp_path / "acl").write_text(ACL)
    tls = (f"cafile {certs['ca'][0]}\ncertfile {certs['server'][0]}\nkeyfile {certs['server'][1]}\n"
           f"require_certificate true\nuse_identity_as_username true\nacl_file {tmp_path / 'acl'}\n")
    fleet = Fleet.__new__(Fleet)
    fleet.tmp, fleet.setup, fleet.agent, fleet.controller = tmp_path, fleet_bundles, None, None
    fleet.broker = Broker(tmp_path / "broker", extra=tls)
    requester = None
    try:
        fleet.address = BrokerAddress("127.0.0.1", fleet.broker.port, True, ca_file=str(certs["ca"][0]),
                                      cert_file=str(certs["edgepack-fleet"][0]), key_file=str(certs["edgepack-fleet"][1]))
        fleet.store = tmp_path / "store"
        fleet.versions = iter(range(1, 1_000_000))
        fleet.config = tmp_path / "agent.yaml"
        fleet.config.write_text(json.dumps({
            "device_id": DEVICE, "profile": "x86-64", "store": str(fleet.store), "trusted_keys": [str(fleet_bundles["public"])],
            "fleet_keys": [str(fleet_bundles["public"])],
            "mqtt": {"host": "127.0.0.1", "port": fleet.broker.port, "ca_file": str(certs["ca"][0]),
                     "cert_file": str(certs[DEVICE][0]), "key_file": str(certs[DEVICE][1]), "reconnect_min_s": 0.2},
            "telemetry": {"interval_s": 0.3}, "updates": {"probation_s": 1.0, "chunk_timeout_s": 2.0},
            # the streams' own connection ({device}-stream) goes through the same TLS and ACL
            "models": [{"name": "fleet", "stream": True}]}))
        assert run_cli("install", fleet_bundles["bundles"][("1.0.0", "x86-64")], "--config", fleet.config,
                       program="edgepack-agent").returncode == 0
        fleet.start_controller()
        fleet.start_agent()
        wait_for(lambda: len(fleet.controller.registry.messages(DEVICE, "telemetry")) >= 2, 30, "telemetry over TLS")
        fleet.push("1.1.0")  # the controller may write desired topics; the update goes through over TLS
        fleet.wait_commit("1.1.0")
        try:
            wait_for(lambda: any((m["body"].get("stream_link") or {}).get("connected")
                                 for m in fleet.controller.registry.messages(DEVICE, "telemetry")), 30,
                     "the stream connection up over TLS, in telemetry")
        except AssertionError:
            last = fleet.controller.registry.messages(DEVICE, "telemetry")[-1:]
            tail = "\n".join(line[:300] for line in fleet.agent.lines[-15:])
            raise AssertionError(f"stream link not up over TLS; last telemetry {json.dumps(last)[-1500:]}\n{tail}") from None

        # A stream request over TLS from a client the ACL lets write it: answered on the same TLS link.
        answers: dict = {}
        requester = fleet.address.client("stream-requester")
        requester.on_message = lambda c, u, m: answers.setdefault(json.loads(m.payload).get("id"), json.loads(m.payload))
        requester.connect("127.0.0.1", fleet.broker.port)
        requester.subscribe(topics.stream(DEVICE, "fleet", "out"), 1)
        requester.loop_start()
        request = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}
        for _ in range(10):  # until the requester's subscription is in place
            requester.publish(topics.stream(DEVICE, "fleet", "in"), json.dumps({**request, "id": "tls"}), qos=1)
            deadline = time.monotonic() + 2.0
            while "tls" not in answers and time.monotonic() < deadline:
                time.sleep(0.05)
            if "tls" in answers:
                break
        assert "tls" in answers, "no streamed answer over TLS within 20 s"
        assert answers["tls"]["outputs"][0]["shape"] == [1, 4]
        metrics = httpx.get(f"{fleet.agent.url}/metrics", timeout=10).text
        assert "edgepack_mqtt_stream_connected 1.0" in metrics

        # A real second device, with its own valid certificate, tries to write where it must not.
        intruder = BrokerAddress("127.0.0.1", fleet.broker.port, True, ca_file=str(certs["ca"][0]),
                                 cert_file=str(certs["dev2"][0]), key_file=str(certs["dev2"][1])).client("dev2")
        acks: dict = {}
        intruder.on_publish = lambda c, u, mid, rc, p=None: acks.__setitem__(mid, rc)
        intruder.connect("127.0.0.1", fleet.broker.port)
        intruder.loop_start()
        forged = {"schema": 1, "kind": "telemetry", "device": DEVICE, "boot": "forged", "seq": 999999}
        attempts = {
            "other device's telemetry": intruder.publish(topics.telemetry(DEVICE), json.dumps(forged), qos=1).mid,
            "own desired": intruder.publish(topics.desired("dev2"), b"{}", qos=1, retain=True).mid,
            "other device's desired": intruder.publish(topics.desired(DEVICE), b"{}", qos=1, retain=True).mid,
            "group desired": intruder.publish(topics.group_desired("all"), b"{}", qos=1, retain=True).mid,
            "other device's stream": intruder.publish(topics.stream(DEVICE, "fleet", "in"),
                                                      json.dumps({**request, "id": "forged"}), qos=1).mid,
        }
        allowed = intruder.publish(topics.telemetry("dev2"), json.dumps({**forged, "device": "dev2"}), qos=1).mid
        wait_for(lambda: len(acks) == 6, 10, "the broker's answers")
        intruder.loop_stop()
        intruder.disconnect()
        for what, mid in attempts.items():
            assert acks[mid].value == 135, f"{what}: {acks[mid]}"  # MQTT 5 "Not authorized"
        assert not acks[allowed].is_failure
        time.sleep(1.0)
        assert not [m for m in fleet.controller.registry.messages(DEVICE, None) if m["boot"] == "forged"]
        requester.loop_stop()
        requester.disconnect()
        requester = None
        # the broker never delivered the other device's stream request, so it was never answered
        assert "forged" not in answers and set(answers) == {"tls"}
        assert fleet.active() == "1.1.0" and fleet.agent.process.poll() is None
    finally:
        if requester is not None:
            requester.loop_stop()
            requester.disconnect()
        fleet.close()


def test_group_desired_state_updates_a_member(fleet, fleet_bundles):
    config = json.loads(fleet.config.read_text())
    config["updates"]["groups"] = ["kitchen"]
    fleet.config.write_text(json.dumps(config))
    fleet.start_controller()
    fleet.start_agent()
    bundle = fleet_bundles["bundles"][("1.1.0", "x86-64")]
    fleet.controller.shelf.add(bundle)
    state = desired_for_bundles([bundle, fleet_bundles["bundles"][("1.1.0", "rpi4")]], device=None, group="kitchen",
                                version=1, expires_s=3600)
    publish_retained(fleet.address, topics.group_desired("kitchen"),
                     sign_desired(state, load_private_key(fleet_bundles["private"])), "group-pusher")
    fleet.wait_commit("1.1.0")
    # a group this device does not follow is not its business (not even subscribed)
    other = desired_for_bundles([bundle], device=None, group="garage", version=1, expires_s=3600)
    publish_retained(fleet.address, topics.group_desired("garage"),
                     sign_desired(other, load_private_key(fleet_bundles["private"])), "group-pusher-2")
    time.sleep(1.0)
    assert fleet.active() == "1.1.0" and not fleet.events("desired_refused")


def _shadow_report(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/v2/models/fleet/shadow", timeout=10) as response:
        return json.loads(response.read())


def test_a_shadow_the_fleet_asks_for_runs_beside_the_active_version_and_is_promoted_without_a_download(fleet):
    """The real agent: the fleet's desired state names 1.0.0 with 1.1.0 in shadow; the agent fetches the
    shadow bundle over MQTT, answers every request with 1.0.0 and compares 1.1.0; its agreement reaches
    the controller's rollups; pushing 1.1.0 then installs it from the shadow's bundle; a NaN candidate
    in shadow is counted and never seen by a client."""
    from sqlalchemy import select

    from edgepack.fleet.db import rollup_shadow

    fleet.start_controller()
    agent = fleet.start_agent()
    wait_for(lambda: fleet.controller.registry.devices(), 30, "the agent online")
    fleet.push("1.0.0", shadow="1.1.0")
    started = wait_for(lambda: fleet.events("shadow_started"), 60, "the shadow started")
    assert started[-1]["version"] == "1.1.0"
    rng = np.random.default_rng(3)

    def compared_after_one_more():
        # The shadow never delays the active version: on a loaded host its full queue drops comparisons, so
        # requests go on until 35 were compared (40 were enough on a quiet one).
        status, body = infer(agent.url, rng.uniform(0.1, 1.0, 8).astype(float).tolist())
        assert status == 200 and body["model_version"] == "1.0.0"
        report = _shadow_report(agent.url)
        return report.get("requests", {}).get("compared", 0) >= 35 and report

    report = wait_for(compared_after_one_more, 90, "the comparisons")
    assert report["version"] == "1.1.0" and report["active"] == "1.0.0" and report["agreement"] == 1.0
    registry = fleet.controller.registry

    def rolled_up():
        with registry.engine.connect() as db:
            rows = db.execute(select(rollup_shadow).where(rollup_shadow.c.version == "1.1.0")).all()
        return [r for r in rows if r.samples >= 35 and r.agreement == 1.0 and r.active == "1.0.0"]

    wait_for(rolled_up, 30, "the shadow's agreement in the controller's rollups")
    shown = wait_for(lambda: (registry.devices()[0]["state"]["models"]["fleet"].get("shadow") or None), 20, "state")
    assert shown == {"version": "1.1.0", "state": "running", "fleet": True}
    assert (fleet.store / "shadow" / "fleet").is_dir()

    # Promotion: the bundle is taken from the shadow, nothing downloaded again
    progress_before = len(fleet.events("download_progress"))
    fleet.push("1.1.0")
    fleet.wait_commit("1.1.0")
    skipped = wait_for(lambda: fleet.events("download_skipped"), 10, "the skipped download")
    assert skipped[-1] == {"model": "fleet", "version": "1.1.0", "reason": "shadow"} or skipped[-1]["reason"] == "shadow"
    assert len(fleet.events("download_progress")) == progress_before
    wait_for(lambda: not (fleet.store / "shadow" / "fleet").exists(), 20, "the shadow folder removed")

    # A candidate that returns NaN (for negative inputs), in shadow: counted, never answered
    fleet.push("1.1.0", shadow="1.2.0")
    wait_for(lambda: any(e["version"] == "1.2.0" for e in fleet.events("shadow_started")), 60, "the NaN shadow")
    for _ in range(20):
        status, body = infer(agent.url, -0.5)
        assert status == 200 and body["model_version"] == "1.1.0"
        assert all(np.isfinite(v) for o in body["outputs"] for v in o["data"])
    report = wait_for(lambda: (r := _shadow_report(agent.url)).get("requests", {}).get("nonfinite", 0) >= 10 and r,
                      30, "the NaN counted")
    assert report["version"] == "1.2.0" and report["agreement"] < 1.0
    # and a desired state without the shadow stops it
    fleet.push("1.1.0")
    wait_for(lambda: fleet.events("shadow_stopped"), 30, "the shadow stopped")
    assert agent.stop() == 0


KILL_AT_ATTACH = """
import os, signal, sys
from agent.serving.registry import ModelRegistry
from agent.cli import main
async def attach_shadow(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # the shadow's bundle is downloaded and kept: killed before it runs
ModelRegistry.attach_shadow = attach_shadow
"""


def test_kill_9_after_the_shadow_download_runs_it_at_restart_without_downloading_it_again(fleet):
    fleet.start_controller()
    fleet.start_agent(python_code=KILL_AT_ATTACH)
    probe = Probe(fleet)
    probe.start()
    wait_for(lambda: fleet.controller.registry.devices(), 30, "the agent online")
    fleet.push("1.0.0", shadow="1.1.0")
    assert fleet.agent.process.wait(90) == -signal.SIGKILL
    assert list((fleet.store / "shadow" / "fleet").glob("*.edgepack"))
    downloads = len([e for e in fleet.events("download_progress") if e.get("version") == "1.1.0"])
    agent = fleet.start_agent()
    wait_for(lambda: fleet.events("shadow_started"), 60, "the shadow started after the restart")
    for _ in range(10):
        status, body = infer(agent.url, 0.5)
        assert status == 200 and body["model_version"] == "1.0.0"
    report = wait_for(lambda: (r := _shadow_report(agent.url)).get("requests", {}).get("compared", 0) >= 5 and r,
                      30, "comparisons after the restart")
    assert report["version"] == "1.1.0" and report["agreement"] == 1.0
    assert len([e for e in fleet.events("download_progress") if e.get("version") == "1.1.0"]) == downloads
    probe.wait_answered(agent.url)
    seen = probe.stop()
    assert {status for status, _ in seen} <= {0, 200} and seen[-1][0] == 200, probe.runs()
    assert fleet.active() == "1.0.0"
