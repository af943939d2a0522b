"""Unit tests of agent/updates and the fleet link's logic: the probation verdict, the acceptance rule
of desired states (replays, reused versions, key roles, the clock floor), the update record failing
closed, downloads checked against the signed chunk list, the spool on a full disk, and the MQTT
fallback to 3.1.1 when a broker drops the socket without a CONNACK (a real socket)."""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import threading
import time

import pytest

from agent.config import ConfigError, load_config
from agent.fleet.spool import Spool, SpoolWriter, open_spool
from agent.updates import record as records
from agent.updates.download import BadChunk, Download
from agent.updates.errors import TransientUpdateError
from agent.updates.probation import COMMIT, ROLL_BACK, WAIT, Budget, judge
from edgepack.bundle.format import is_valid_name
from edgepack.bundle.signing import generate_keys, load_private_key, load_public_key, sign_manifest
from edgepack.fleet import topics
from edgepack.fleet.desired import (BundleRef, DesiredState, DesiredStateError, ModelRef, chunk_digests_of, sign_desired,
                                    verify_desired)

CHUNK = 1000


def _health(runs=0, errors=0, nonfinite=0, excluded=0, p50=0.001, p95=0.002):
    return {"runs": runs, "errors": errors, "nonfinite": nonfinite, "excluded": excluded, "judged_runs": runs - excluded,
            "sample_seconds_p50": p50, "run_seconds_p95": p95}


@pytest.mark.parametrize("new,old,elapsed,ratio,budget,decision,reason", [
    (_health(30), _health(30), 10, None, {}, COMMIT, None),
    (_health(30), None, 1, None, {}, WAIT, None),
    (_health(3, nonfinite=3), None, 10, None, {}, COMMIT, None),  # below min_runs: no verdict on rates
    (_health(30, nonfinite=30), _health(30), 1, None, {}, ROLL_BACK, "nonfinite"),
    # a client that sends garbage to both versions vetoes nothing: the old one had the same rate
    (_health(40, nonfinite=8), _health(40, nonfinite=8), 10, None, {}, COMMIT, None),
    (_health(40, errors=10), _health(40, errors=0), 1, None, {}, ROLL_BACK, "errors"),
    # an overflowing input is left out of the verdict
    (_health(30, nonfinite=0, excluded=1), _health(30), 10, None, {}, COMMIT, None),
    # slower by design: no limit unless the budget sets one
    (_health(30, p50=0.01), _health(30, p50=0.001), 10, 10.0, {}, COMMIT, None),
    (_health(30, p50=0.01), _health(30, p50=0.001), 1, 10.0, {"max_latency_ratio": 3.0}, ROLL_BACK, "latency"),
    (_health(30, p50=0.01), _health(30, p50=0.001), 10, 10.0, {"max_latency_ratio": 20.0}, COMMIT, None),
    (_health(30, p95=0.2), None, 1, None, {"max_p95_ms": 50}, ROLL_BACK, "latency"),
    (_health(30, p95=0.2), None, 1, None, {"deadline_ms": 100}, ROLL_BACK, "latency"),
])
def test_probation_verdict(new, old, elapsed, ratio, budget, decision, reason):
    verdict = judge(Budget(duration_s=5, min_runs=20, **budget), new, old, elapsed, ratio)
    assert (verdict.decision, verdict.reason) == (decision, reason), verdict


def test_signed_budget_overrides_the_device_settings():
    class Options:
        probation_s, min_runs, max_error_rate, max_nonfinite_rate, max_latency_ratio, max_p95_ms = 60, 20, 0.05, 0.05, None, None

    budget = Budget.of(Options, {"max_latency_ratio": 2.5, "duration_s": 5}, deadline_ms=None)
    assert budget.max_latency_ratio == 2.5 and budget.duration_s == 5 and budget.min_runs == 20


@pytest.fixture()
def keys(tmp_path):
    private, public = generate_keys(tmp_path / "fleet")
    other, _ = generate_keys(tmp_path / "other")
    return load_private_key(private), [load_public_key(public)], load_private_key(other)


def _bundle(tmp_path, size=2500, chunk=None):
    """A random bundle file and its reference; chunks of the protocol's size unless ``chunk`` is given."""
    import hashlib

    from edgepack.fleet.chunks import CHUNK_BYTES

    chunk = chunk or CHUNK_BYTES
    path = tmp_path / "b.edgepack"
    path.write_bytes(os.urandom(size))
    return path, BundleRef(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=size, chunk_bytes=chunk,
                           chunks=chunk_digests_of(path, chunk))


def _state(ref, version, issued=None, **fields):
    now = issued or time.time()
    return DesiredState(version=version, device="dev1", issued_at=now, expires_at=now + 3600,
                        model=ModelRef(name="m", version="1.0.0"), bundles={"x86-64": ref}, **fields)


def _check(record, payload, keys):
    return records.check_desired(record, topics.desired("dev1"), payload, device="dev1", groups=[], keys=keys,
                                 profile="x86-64")


def test_acceptance_rule_replays_reused_versions_and_key_roles(tmp_path, keys):
    private, public, other = keys
    _, ref = _bundle(tmp_path)
    record = records.empty_record()
    payload = sign_desired(_state(ref, 5), private)
    state, bundle = _check(record, payload, public)
    records.accept(record, topics.desired("dev1"), state, bundle)
    assert _check(record, payload, public) is None  # the retained copy again: nothing to do
    with pytest.raises(DesiredStateError) as reused:
        _check(record, sign_desired(_state(ref, 5, issued=time.time() + 1), private), public)
    assert reused.value.reason == "reused-version"
    with pytest.raises(DesiredStateError) as replayed:
        _check(record, sign_desired(_state(ref, 4), private), public)
    assert replayed.value.reason == "replayed"
    with pytest.raises(DesiredStateError) as untrusted:
        _check(record, sign_desired(_state(ref, 6), other), public)
    assert untrusted.value.reason == "untrusted"
    # domain separation: a signature over the bare document (as a bundle manifest is signed) is invalid
    document = json.dumps(_state(ref, 7).document(), sort_keys=True, separators=(",", ":"))
    bare = json.dumps({"schema": 1, "desired": document, "signatures": sign_manifest(document.encode(), private)}).encode()
    with pytest.raises(DesiredStateError) as bad:
        _check(record, bare, public)
    assert bad.value.reason == "bad-signature"


def test_lone_surrogate_and_trailing_newline_are_refused(tmp_path, keys):
    private, public, _ = keys
    payload = json.dumps({"schema": 1, "desired": "{\"a\": \"\\ud800\"}", "signatures": {"signatures": [{}]}})
    envelope = json.loads(payload)
    envelope["desired"] = "\ud800"
    raw = json.dumps(envelope).encode()
    with pytest.raises(DesiredStateError) as malformed:
        verify_desired(raw, public)
    assert malformed.value.reason == "malformed"
    assert not is_valid_name("model\n") and is_valid_name("model")


def test_clock_floor_keeps_expired_states_expired_and_one_far_future_push_poisons_nothing(tmp_path, keys):
    private, public, _ = keys
    _, ref = _bundle(tmp_path)
    record = records.empty_record()
    future = _state(ref, 1, issued=time.time() + 10 * 365 * 86400)
    future = future.model_copy(update={"expires_at": future.issued_at + 3600})
    state, bundle = _check(record, sign_desired(future, private), public)
    records.accept(record, topics.desired("dev1"), state, bundle)
    assert record["clock"] <= time.time()  # capped at the device's own clock: normal pushes stay valid
    state, _ = _check(record, sign_desired(_state(ref, 2), private), public)
    assert state.version == 2
    # a device clock set back cannot revive a state that expired by the newest issue time seen
    record["clock"] = time.time() + 7200
    old = _state(ref, 3)  # expires in one hour of real time: before the floor
    with pytest.raises(DesiredStateError) as expired:
        _check(record, sign_desired(old, private), public)
    assert expired.value.reason == "expired"
    assert records.clock_now(record)[1]  # and the clock is reported as behind


def test_signed_chunk_size_must_be_the_protocols(tmp_path, keys):
    private, public, _ = keys
    _, ref = _bundle(tmp_path, 2500, CHUNK)
    with pytest.raises(DesiredStateError, match="chunks of 1000 bytes"):
        _check(records.empty_record(), sign_desired(_state(ref, 1), private), public)


def test_update_record_fails_closed_and_reset_seeds_the_counters(tmp_path):
    folder = tmp_path / "fleet"
    folder.mkdir()
    (folder / "desired.json").write_text('{"accepted": {"x": 3}, "mode')
    with pytest.raises(records.RecordCorrupt, match="reset-updates"):
        records.read_record(tmp_path)
    for bad in ('["not", "a", "record"]', '{"clock": "soon"}', '{"models": {"m": "7"}}', '{"wanted": {"m": 3}}'):
        (folder / "desired.json").write_text(bad)
        with pytest.raises(records.RecordCorrupt):
            records.read_record(tmp_path)
    moved = records.reset_record(tmp_path, {"m": {"update": {"target": {"desired_version": 41}}}})
    assert moved and moved.exists()
    assert records.read_record(tmp_path)["models"] == {"m": 41}


def test_download_checks_each_chunk_against_the_signed_list(tmp_path):
    path, ref = _bundle(tmp_path, 2500, CHUNK)
    data = path.read_bytes()
    download = Download(tmp_path / "dl", ref.sha256, ref.size, CHUNK, ref.chunk_digests())
    assert download.write(0, 0, data[:CHUNK])
    forged = bytearray(data[CHUNK:2 * CHUNK])
    forged[5] ^= 1
    for index, offset, chunk in [(1, CHUNK, bytes(forged)), (9, 9 * CHUNK, data[:CHUNK]), (-1, -CHUNK, b"x"),
                                 (2, 2 * CHUNK, data[2 * CHUNK:] + b"!"), (1, 0, data[CHUNK:2 * CHUNK])]:
        with pytest.raises(BadChunk):
            download.write(index, offset, chunk)
    assert download.received == {0}  # forged frames discard nothing
    assert not download.write(0, 0, data[:CHUNK])  # a repeat
    download.write(1, CHUNK, data[CHUNK:2 * CHUNK])
    download.write(2, 2 * CHUNK, data[2 * CHUNK:])
    assert download.complete and download.verify().read_bytes() == data
    resumed = Download(tmp_path / "dl", ref.sha256, ref.size, CHUNK, ref.chunk_digests())
    assert resumed.complete and resumed.progress()["percent"] == 100.0


def test_download_on_a_full_disk_is_transient_and_keeps_what_it_has(tmp_path, monkeypatch):
    path, ref = _bundle(tmp_path, 2500, CHUNK)
    data = path.read_bytes()
    download = Download(tmp_path / "dl", ref.sha256, ref.size, CHUNK, ref.chunk_digests())
    download.write(0, 0, data[:CHUNK])

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(TransientUpdateError) as exc:
        download.write(1, CHUNK, data[CHUNK:2 * CHUNK])
    assert exc.value.reason == "disk-full" and download.received == {0}
    huge = Download(tmp_path / "dl2", ref.sha256, 10 ** 15, CHUNK, ref.chunk_digests())
    with pytest.raises(TransientUpdateError, match="free some space"):
        huge.check_space()


def test_spool_on_a_full_disk_keeps_its_counts_and_recovers(tmp_path):
    spool = Spool(tmp_path / "s.sqlite")
    spool.add("event", "t", lambda seq, dropped: {"seq": seq})
    pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
    spool._db.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLITE_FULL after a few more rows
    big = "x" * 20000
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for _ in range(50):
            spool.add("event", "t", lambda seq, dropped: {"seq": seq, "pad": big})
    real = spool._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    assert spool.stats()["pending"] == real  # the bound is kept on the real count
    spool._db.execute("PRAGMA max_page_count = 1000000")
    seq = spool.add("event", "t", lambda seq, dropped: {"seq": seq})
    assert seq == spool.stats()["last_seq"] and spool.stats()["pending"] == real + 1
    lost = []
    writer = SpoolWriter(spool, lambda: None, lambda exc, n: lost.append(n))
    spool._db.execute(f"PRAGMA max_page_count = {spool._db.execute('PRAGMA page_count').fetchone()[0]}")
    writer.add("event", "t", lambda seq, dropped: {"seq": seq, "pad": big * 5})
    assert writer.flush(5) and lost == [1]  # counted, never raised to the caller
    writer.close()


def test_damaged_spool_file_is_moved_aside(tmp_path):
    (tmp_path / "s.sqlite").write_bytes(b"not a database" * 100)
    spool, aside = open_spool(tmp_path / "s.sqlite", 100, 1 << 20)
    assert aside and aside.exists() and spool.stats()["pending"] == 0
    assert spool.add("event", "t", lambda seq, dropped: {"seq": seq}) == 1


def test_config_names_are_single_topic_levels_and_tls_paths_exist(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("updates: {groups: ['kitchen/#']}\n")
    with pytest.raises(ConfigError, match="one MQTT topic level"):
        load_config(bad)
    tls = tmp_path / "tls.yaml"
    tls.write_text("mqtt: {host: 127.0.0.1, ca_file: missing-ca.pem}\n")
    with pytest.raises(ConfigError, match="mqtt.ca_file"):
        load_config(tls)


class ThreeOneOneOnly(threading.Thread):
    """A broker that closes the socket on an MQTT 5 CONNECT (no CONNACK) and accepts 3.1.1."""

    def __init__(self):
        super().__init__(daemon=True)
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.levels = []
        self.open = []

    def run(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            packet = conn.recv(4096)
            # fixed header, remaining length (1 byte here), protocol name (2 + 4), then the level
            level = packet[2 + 6] if len(packet) > 8 else None
            self.levels.append(level)
            if level == 4:
                conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
                self.open.append(conn)
            else:
                conn.close()

    def stop(self):
        self.server.close()
        for conn in self.open:
            conn.close()


def test_transport_falls_back_to_3_1_1_when_the_broker_drops_an_mqtt5_connect(caplog):
    from agent.config import MqttConfig
    from agent.fleet.transport import Transport

    broker = ThreeOneOneOnly()
    broker.start()
    events = []
    transport = Transport(MqttConfig(host="127.0.0.1", port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.1),
                          "dev1", events.append)
    transport.start()
    try:
        deadline = time.monotonic() + 10
        while not transport.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert transport.connected and transport.protocol == "3.1.1"
        assert broker.levels[:2] == [5, 4]
        failures = [e for e in events if e[0] == "link"]
        assert failures and failures[0][2] == "no-connack" and "trying MQTT 3.1.1" in failures[0][1]["last_error"]
        assert any(e[0] == "connected" for e in events)
    finally:
        transport.stop()
        broker.stop()


def test_an_expired_desired_state_with_no_newer_one_is_reported_once(tmp_path, keys):
    from agent.updates.updater import Updater

    private, public, _ = keys
    _, ref = _bundle(tmp_path)
    events = []

    class Options:
        groups = []

    class Config:
        updates, profile = Options, "x86-64"

    class Store:
        root = tmp_path / "store"

    class Registry:
        store, schedulers = Store, {}

    async def scenario():
        updater = Updater(Config, Registry, "dev1", lambda *a: None, lambda kind, body: events.append((kind, body)), public)
        state = _state(ref, 3, issued=time.time() - 10).model_copy(update={"expires_at": time.time() + 0.2})
        updater.handle_desired(topics.desired("dev1"), sign_desired(state, private))
        assert updater.check_stale() == []
        await __import__("asyncio").sleep(0.3)
        assert updater.check_stale() == ["m"] and updater.check_stale() == ["m"]

    __import__("asyncio").run(scenario())
    kinds = [kind for kind, _ in events]
    assert kinds == ["desired_accepted", "desired_stale"], kinds


def test_the_chunk_retransmit_timer_follows_the_measured_round_trip():
    """RFC 6298 over chunk round trips: never below the configured floor, above it when the broker
    queues frames for long, doubled per loss until a clean round trip comes."""
    from agent.updates.updater import RetransmitTimer

    timer = RetransmitTimer(10.0)
    assert timer.timeout == 10.0
    for _ in range(20):
        timer.sample(0.05)
    assert timer.timeout == 10.0  # a fast broker: the floor
    for _ in range(40):
        timer.sample(12.0)
    assert 12.0 < timer.timeout < 20.0  # a queue of 12 s: not asked again at 10 s
    before = timer.timeout
    timer.backoff()
    assert timer.timeout == min(RetransmitTimer.MAX_S, 2 * before)
    for _ in range(10):
        timer.backoff()
    assert timer.timeout == min(RetransmitTimer.MAX_S, 8 * before)  # at most 8x
    timer.sample(12.0)
    assert timer.timeout < 20.0
