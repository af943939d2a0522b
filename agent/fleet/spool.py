"""The outgoing-message spool: every telemetry and event message is written here (SQLite, WAL) before
it is sent, and deleted only when the broker acknowledged it (PUBACK), so nothing measured is lost
when the network, the broker or the agent goes down.

Each message gets the next sequence number of this device, persisted with it, so the fleet can
drop duplicates (a message sent again after a reconnect or a restart) and see gaps. The spool is
bounded (``max_messages``, ``max_bytes``). **Drop policy** when full: the oldest telemetry goes
first (it is periodic, and the next message summarises the same counters again); events go only
when nothing but events is left. What was dropped is counted and the count rides on the next
telemetry message (``dropped``), then resets.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Spool:
    """A bounded, durable FIFO of (seq, topic, payload)."""

    def __init__(self, path: Path, max_messages: int = 100_000, max_bytes: int = 64 * 1024 * 1024):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a message the agent counted as spooled survives a power cut too (WAL keeps it cheap).
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._count, self._bytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, value))

    def add(self, kind: str, topic: str, build) -> int:
        """Spool one message; ``build(seq, dropped)`` returns its payload dict (it gets ``seq`` and, for
        telemetry, the count of messages dropped since the last one). Returns the sequence number."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta("next_seq") + 1
                dropped = self._meta("dropped") if kind == "telemetry" else 0
                payload = json.dumps(build(seq, dropped), separators=(",", ":")).encode()
                if dropped:
                    self._set_meta("dropped", 0)  # reported in this message; room made for it counts next
                self._make_room(len(payload))
                self._db.execute("INSERT INTO outbox(seq, kind, topic, payload, created) VALUES(?, ?, ?, ?, ?)",
                                 (seq, kind, topic, payload, time.time()))
                self._set_meta("next_seq", seq)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count += 1
            self._bytes += len(payload)
            return seq

    def _make_room(self, incoming: int) -> None:
        dropped = 0
        while self._count and (self._count + 1 > self.max_messages or self._bytes + incoming > self.max_bytes):
            row = (self._db.execute("SELECT seq, LENGTH(payload) FROM outbox WHERE kind = 'telemetry' ORDER BY seq LIMIT 1").fetchone()
                   or self._db.execute("SELECT seq, LENGTH(payload) FROM outbox ORDER BY seq LIMIT 1").fetchone())
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[0],))
            self._count -= 1
            self._bytes -= row[1]
            dropped += 1
        if dropped:
            self._set_meta("dropped", self._meta("dropped") + dropped)
            self._set_meta("dropped_total", self._meta("dropped_total") + dropped)

    def pending(self, after: int = 0, limit: int = 100) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` messages with seq > ``after``, oldest first."""
        with self._lock:
            return self._db.execute("SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after, limit)).fetchall()

    def ack(self, seqs) -> None:
        """The broker has these messages: forget them (one transaction, one fsync, for all of them;
        a crash before it only means they are sent again, and the fleet drops the duplicates)."""
        seqs = [seqs] if isinstance(seqs, int) else list(seqs)
        if not seqs:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed = freed = 0
                for seq in seqs:
                    row = self._db.execute("SELECT LENGTH(payload) FROM outbox WHERE seq = ?", (seq,)).fetchone()
                    if row:
                        self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                        removed, freed = removed + 1, freed + row[0]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count -= removed
            self._bytes -= freed

    def stats(self) -> dict:
        with self._lock:
            return {"pending": self._count, "bytes": self._bytes, "dropped_total": self._meta("dropped_total"),
                    "last_seq": self._meta("next_seq")}

    def close(self) -> None:
        with self._lock:
            self._db.close()
