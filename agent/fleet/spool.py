"""The outgoing-message spool: every telemetry and event message is written here (SQLite, WAL) before
it is sent, and deleted only when the broker acknowledged it (PUBACK), so nothing measured is lost
when the network, the broker or the agent goes down.

Each message gets the next sequence number of this device, persisted with it, so the fleet can
drop duplicates (a message sent again after a reconnect or a restart) and see gaps. The spool is
bounded (``max_messages``, ``max_bytes``). **Drop policy** when full: the oldest telemetry goes
first (it is periodic, and the next message summarises the same counters again); events go only
when nothing but events is left. What was dropped is counted and the count rides on the next
telemetry message (``dropped``), then resets.

A damaged spool file (a power cut, a worn SD card) never stops the daemon: :func:`open_spool` moves it
aside (``spool.sqlite.corrupt-<time>``, kept for inspection) and starts an empty one. A full disk makes
:meth:`Spool.add` fail with its real error; the in-memory counts are then read again from the file,
so the bound keeps holding.

:class:`SpoolWriter` runs the fsynced writes (adds and acknowledgements, batched: one transaction per
batch) on its own thread, off the daemon's event loop.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("edgepack.agent.spool")

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
        self._recount()
        # Reads (the sender's, the counters') go through their own connection: with WAL they see the
        # last commit without waiting for the writer's fsync.
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._read_lock = threading.Lock()

    def _recount(self) -> None:
        self._count, self._bytes = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()

    def _rollback(self) -> None:
        """Undo a failed transaction (SQLite may have rolled it back itself: SQLITE_FULL does), and read
        the counts again so the bound holds whatever was written."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        try:
            self._recount()
        except sqlite3.Error:
            pass

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, value))

    def add(self, kind: str, topic: str, build) -> int:
        """Spool one message; ``build(seq, dropped)`` returns its payload dict (it gets ``seq`` and, for
        telemetry, the count of messages dropped since the last one). Returns the sequence number."""
        return self.add_many([(kind, topic, build)])[0]

    def add_many(self, items) -> list[int]:
        """Spool several ``(kind, topic, build)`` messages in one transaction; their sequence numbers."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seqs = []
                for kind, topic, build in items:
                    seq = self._meta("next_seq") + 1
                    dropped = self._meta("dropped") if kind == "telemetry" else 0
                    try:
                        payload = json.dumps(build(seq, dropped), separators=(",", ":"), default=str).encode()
                    except (TypeError, ValueError) as exc:  # one bad message does not cost its batch
                        log.error("message not spooled", extra={"error": str(exc), "kind": kind})
                        continue
                    if dropped:
                        self._set_meta("dropped", 0)  # reported in this message; room made for it counts next
                    self._make_room(len(payload))
                    self._db.execute("INSERT INTO outbox(seq, kind, topic, payload, created) VALUES(?, ?, ?, ?, ?)",
                                     (seq, kind, topic, payload, time.time()))
                    self._set_meta("next_seq", seq)
                    self._count += 1
                    self._bytes += len(payload)
                    seqs.append(seq)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return seqs

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
        with self._read_lock:
            return self._reader.execute("SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
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
                self._rollback()
                raise
            self._count -= removed
            self._bytes -= freed

    def stats(self) -> dict:
        with self._read_lock:
            meta = dict(self._reader.execute("SELECT key, value FROM meta WHERE key IN ('dropped_total', 'next_seq')").fetchall())
        return {"pending": self._count, "bytes": self._bytes, "dropped_total": meta.get("dropped_total", 0),
                "last_seq": meta.get("next_seq", 0)}

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._db.close()


def open_spool(path: Path, max_messages: int, max_bytes: int) -> tuple[Spool, Path | None]:
    """The spool at ``path``; a damaged file is moved aside first (the second value says where)."""
    path = Path(path)
    try:
        spool = Spool(path, max_messages, max_bytes)
        problem = spool._db.execute("PRAGMA quick_check").fetchone()[0]
        if problem == "ok":
            return spool, None
        spool.close()
    except sqlite3.OperationalError:
        raise  # a full disk or an I/O error is not a damaged file: nothing is thrown away for it
    except sqlite3.DatabaseError:
        pass  # SQLITE_NOTADB / SQLITE_CORRUPT
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    log.error("telemetry spool damaged; moved aside, starting an empty one", extra={"spool": str(path), "aside": str(aside)})
    return Spool(path, max_messages, max_bytes), aside


class SpoolWriter:
    """Adds and acknowledgements of a :class:`Spool`, written on one thread in batches (one
    transaction, one fsync per batch), so the event loop never waits for the disk.

    ``written()`` is called (on the writer thread) after each batch; ``failed(exc)`` when a batch could
    not be written (a full disk): its messages are counted as lost, never raised to the caller."""

    def __init__(self, spool: Spool, written: Callable[[], None], failed: Callable[[Exception, int], None]):
        self.spool = spool
        self.written = written
        self.failed = failed
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def _submit(self, item) -> None:
        with self._done:
            self._pending += 1
        self._queue.put(item)

    def add(self, kind: str, topic: str, build) -> None:
        self._submit(("add", (kind, topic, build)))

    def ack(self, seqs: list[int]) -> None:
        self._submit(("ack", list(seqs)))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted is written (or failed); False on time-out."""
        with self._done:
            return self._done.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(entry is None for entry in batch)
            batch = [entry for entry in batch if entry is not None]
            adds = [entry[1] for entry in batch if entry[0] == "add"]
            acks = [seq for entry in batch if entry[0] == "ack" for seq in entry[1]]
            for what, work in (("ack", acks), ("add", adds)):
                if not work:
                    continue
                try:
                    self.spool.ack(work) if what == "ack" else self.spool.add_many(work)
                except Exception as exc:  # noqa: BLE001 - a full disk must not stop the writer
                    self.failed(exc, len(work) if what == "add" else 0)
            try:
                self.written()
            except Exception:  # noqa: BLE001
                pass
            with self._done:
                self._pending -= len(batch)
                self._done.notify_all()
            if stop:
                return
