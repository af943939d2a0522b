"""The telemetry spool: durable order, acknowledgements, the bound and its drop policy."""

from __future__ import annotations

import json

from agent.fleet.spool import Spool


def _add(spool: Spool, kind: str) -> int:
    return spool.add(kind, f"t/{kind}", lambda seq, dropped: {"seq": seq, "kind": kind, "dropped": dropped, "pad": "x" * 100})


def test_sequence_survives_reopen_and_acks_delete(tmp_path):
    spool = Spool(tmp_path / "s.sqlite")
    assert [_add(spool, "telemetry") for _ in range(3)] == [1, 2, 3]
    spool.ack([1, 3])
    spool.close()
    again = Spool(tmp_path / "s.sqlite")
    assert [seq for seq, _, _ in again.pending()] == [2]  # what the broker never acknowledged, in order
    assert _add(again, "event") == 4  # the sequence goes on after a restart
    assert [seq for seq, _, _ in again.pending(after=2)] == [4]


def test_full_spool_drops_oldest_telemetry_first_and_reports_it(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_messages=10)
    _add(spool, "event")
    for _ in range(9):
        _add(spool, "telemetry")
    for _ in range(5):
        _add(spool, "event")  # each makes room by dropping the oldest telemetry, never the event
    kinds = [json.loads(payload)["kind"] for _, _, payload in spool.pending()]
    assert kinds.count("event") == 6 and kinds.count("telemetry") == 4 and len(kinds) == 10
    seq = _add(spool, "telemetry")  # the next telemetry message carries what was dropped
    message = json.loads(next(p for s, _, p in spool.pending(limit=100) if s == seq))
    assert message["dropped"] == 5  # the room made for the five events (room made for itself: next)
    assert spool.stats()["dropped_total"] == 6
    next_seq = _add(spool, "telemetry")
    assert json.loads(next(p for s, _, p in spool.pending(limit=100) if s == next_seq))["dropped"] == 1
    for _ in range(20):
        _add(spool, "event")  # only events left: the oldest events go
    assert len(spool.pending(limit=100)) == 10


def test_byte_bound(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_bytes=64 * 1024)
    for _ in range(1000):
        _add(spool, "telemetry")
    assert spool.stats()["bytes"] <= 64 * 1024
