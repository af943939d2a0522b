"""The fleet registry: devices (what they report, and the tags and groups the controller assigns),
every telemetry/event message once, and telemetry rolled up per device, model, version and minute.

Messages are unique per (device, boot, seq), so one delivered twice (at-least-once MQTT, resent from a
device's spool) is stored once. Writes come in batches (one transaction for many messages): the
controller acknowledges a message to the broker only after the batch holding it is committed.
"""

from __future__ import annotations

import json
import math
import time

from sqlalchemy import and_, delete, func, or_, select, true, update

from . import db as tables
from .db import devices, messages, open_engine, rollup_classes, rollups


def _drifted(drift) -> bool | None:
    """Whether a telemetry message's drift scores raised an alarm (None: no drift scores)."""
    if not isinstance(drift, dict) or not isinstance(drift.get("tests"), dict):
        return None
    return any(isinstance(t, dict) and t.get("alarm") for t in drift["tests"].values())


def _number(value, default=0.0) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return value if math.isfinite(value) and abs(value) < 1e15 else default


def _clean(value, limit: int) -> str:
    """A short text column's value: a string, no NUL (PostgreSQL refuses it), at most ``limit``."""
    return str(value).replace("\x00", "")[:limit]


_SUMS = ("requests", "errors", "p95_weighted", "p95_requests", "drift_messages", "drifted_messages")
#: one SQL text for SQLite and PostgreSQL (both spell upserts this way), run as one executemany
_ROLLUPS_UPSERT = (
    f"INSERT INTO rollups (device, model, version, minute, {', '.join(_SUMS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (device, model, version, minute) DO UPDATE SET "
    + ", ".join(f"{c} = rollups.{c} + excluded.{c}" for c in _SUMS))
_SHADOW_COLUMNS = ("active", "state", "samples", "agreement", "errors", "latency_p95", "ts")
#: a later report of the same minute replaces the row (the numbers are cumulative)
_SHADOW_UPSERT = (
    f"INSERT INTO rollup_shadow (device, model, version, minute, {', '.join(_SHADOW_COLUMNS)}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, model, version, minute) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _SHADOW_COLUMNS)
    + " WHERE rollup_shadow.ts IS NULL OR excluded.ts >= rollup_shadow.ts")
_CLASSES_UPSERT = (
    "INSERT INTO rollup_classes (device, model, version, minute, label, count) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (device, model, version, minute, label) DO UPDATE SET count = rollup_classes.count + excluded.count")


def _shadow_row(shadow, ts: float) -> tuple | None:
    """(candidate version, active, state, samples, agreement, errors, p95 s, ts) of a telemetry entry's
    ``shadow`` summary; None when it has none (or no version)."""
    if not isinstance(shadow, dict) or not isinstance(shadow.get("version"), str):
        return None
    outputs = shadow.get("outputs") if isinstance(shadow.get("outputs"), dict) else {}
    samples = max([int(_number(o.get("samples"))) for o in outputs.values() if isinstance(o, dict)] or [0])
    counts = shadow.get("requests") if isinstance(shadow.get("requests"), dict) else {}
    errors = int(_number(counts.get("errors"))) + int(_number(counts.get("nonfinite")))
    latency = shadow.get("latency_s") if isinstance(shadow.get("latency_s"), dict) else {}
    agreement = _number(shadow.get("agreement"), None)
    active = shadow.get("active") if isinstance(shadow.get("active"), str) else None
    state = shadow.get("state") if isinstance(shadow.get("state"), str) else None
    return (_clean(shadow["version"], 64), _clean(active, 64) if active else None, _clean(state, 16) if state else None,
            samples, agreement, errors, _number(latency.get("p95"), None), float(_number(ts, 0.0)))


class FleetRegistry:
    """Devices, their last reported state, and every telemetry/event message once."""

    def __init__(self, url: str | None = None):
        self.engine = open_engine(url)
        self.insert = tables.insert_for(self.engine)
        self.duplicates = 0
        self.stored = 0
        self._statements: dict[tuple, str] = {}

    # -- ingestion ---------------------------------------------------------------------------------

    def store_batch(self, batch: list[tuple]) -> None:
        """Store ``(device, leaf, message[, text])`` items (leaf: state, telemetry, events; ``text``:
        the message's own JSON, stored as it came when given) in one transaction. Raises on a database
        error: then nothing of the batch is stored (and nothing acknowledged).

        A few statements per batch, not per message: the last state of each device (states of one
        device arrive in order), every message in multi-row ``INSERT … ON CONFLICT DO NOTHING
        RETURNING`` statements (the returned rows are the ones not seen before), and the rollups of
        those, summed per device, version and minute first, in one upsert per table. The messages and
        rollups go as driver SQL (one SQL text, the same on SQLite and PostgreSQL): SQLAlchemy's
        per-row bind processing and a JSON re-encoding of every body were half the writer's time."""
        now = time.time()
        # per device: the last full state of the batch, then a bare "offline" (a Last Will) that came after it
        states: dict[str, list] = {}
        rows: dict[tuple, tuple] = {}
        count = 0
        for device, leaf, message, *text in batch:
            if leaf == "state":
                last = states.setdefault(device, [None, None])
                if message.get("online") is False and "models" not in message:
                    last[1] = message
                else:
                    last[0], last[1] = message, None
            else:
                count += 1
                row = self._message_row(device, message, now, text[0] if text else None)
                rows.setdefault(row[:3], row)  # a duplicate within the batch
        with self.engine.begin() as db:
            for device, pair in states.items():
                for state in pair:
                    if state is not None:
                        self._state(db, device, state, now)
            if not rows:
                return
            stored = self._insert_messages(db, list(rows.values()))
            self.duplicates += count - len(stored)
            self.stored += len(stored)
            telemetry = [rows[key] for key in stored if rows[key][3] == "telemetry"]
            if telemetry:
                self._roll_up(db, telemetry, now)

    #: rows per multi-row INSERT (8 parameters each: far below SQLite's 32,766 and PostgreSQL's 65,535)
    INSERT_ROWS = 500

    def _sql(self, text: str) -> str:
        """``text`` with ``?`` placeholders in the driver's style (psycopg: ``%s``)."""
        return text if self.engine.dialect.name == "sqlite" else text.replace("?", "%s")

    def _insert_messages(self, db, values: list[tuple]) -> set[tuple]:
        """Insert message rows; the (device, boot, seq) of the ones that were new."""
        body = "?" if self.engine.dialect.name == "sqlite" else "CAST(? AS JSON)"
        stored: set[tuple] = set()
        for start in range(0, len(values), self.INSERT_ROWS):
            part = values[start:start + self.INSERT_ROWS]
            statement = self._statements.get(("messages", len(part)))
            if statement is None:
                one = f"(?, ?, ?, ?, ?, ?, ?, {body})"
                statement = self._sql("INSERT INTO messages (device, boot, seq, kind, event, ts, received, body) VALUES "
                                      + ", ".join([one] * len(part)) + " ON CONFLICT DO NOTHING RETURNING device, boot, seq")
                self._statements[("messages", len(part))] = statement
            flat = [value for row in part for value in row[:7]
                    + (row[8] if row[8] is not None else json.dumps(row[7]),)]
            stored.update(tuple(r) for r in db.exec_driver_sql(statement, tuple(flat)))
        return stored

    def _state(self, db, device: str, state: dict, now: float) -> None:
        """Upsert the device's row from a state message.

        Ordering: with ``--share all`` two controllers store one device's messages, so an older state
        can be written after a newer one, and a restarted controller's queued backlog can arrive after
        the retained copy of a newer state. A full state replaces the stored one only when it is newer:
        by its clock within the same boot, by its boot number (``boot_n``) or its clock across boots. A Last Will (or a clean goodbye) says only "offline" and
        applies only to the boot it was set by: a will of the connection before a reboot arriving after
        the new boot's state leaves the device online. Messages without ``boot``/``ts`` (older agents)
        are stored as they come."""
        stored_boot, stored_ts = devices.c.state["boot"].as_string(), devices.c.state["ts"].as_float()
        boot = state.get("boot") if isinstance(state.get("boot"), str) else None
        if state.get("online") is False and "models" not in state:
            # What the device runs stays on record.
            values = {"online": False, "last_seen": now}
            guard = or_(devices.c.state.is_(None), stored_boot.is_(None), stored_boot == boot) if boot else None
            db.execute(self.insert(devices).values(device=device[:128], first_seen=now, tags=[], groups=[], **values)
                       .on_conflict_do_update(index_elements=[devices.c.device], set_=values, where=guard))
            return
        profile = state.get("profile")
        ts = _number(state.get("ts"), None)
        boot_n = state.get("boot_n")
        boot_n = boot_n if isinstance(boot_n, int) and not isinstance(boot_n, bool) and 0 < boot_n < 2 ** 31 else None
        store = _clean(state.get("boot_store"), 32) if isinstance(state.get("boot_store"), str) and boot_n else None
        # What the guard reads back is always a number and a string (PostgreSQL casts it: a stored
        # "ts": "soon" or a boot number past 32 bits would make every later state of the device fail)
        state = {k: v for k, v in state.items() if k not in ("ts", "boot", "boot_n", "boot_store")}
        state.update({"ts": ts} if ts is not None else {}, **({"boot": _clean(boot, 64)} if boot else {}),
                     **({"boot_n": boot_n, "boot_store": store} if store else {}))
        values = {"online": bool(state.get("online")), "profile": _clean(profile, 64) if isinstance(profile, str) else None,
                  "state": state, "last_seen": now}
        guard = None
        if boot and ts is not None:
            # Another boot's state is newer when its boot number says so — the count of the same
            # store, so a device whose clock starts behind is ordered right, and a state the old
            # boot left queued (a controller's backlog drained after the new boot's retained state)
            # is dropped. A state of another store (re-flashed) or without a number (an older
            # agent) wins, as every new boot always did.
            stored_n, stored_store = devices.c.state["boot_n"].as_integer(), devices.c.state["boot_store"].as_string()
            if store:
                other_boot = or_(stored_store.is_(None), stored_store != store, stored_n.is_(None), stored_n < boot_n)
            else:
                other_boot = true()
            guard = or_(devices.c.state.is_(None), stored_boot.is_(None),
                        and_(stored_boot != boot, other_boot),
                        and_(stored_boot == boot, or_(stored_ts.is_(None), stored_ts <= ts)))
        db.execute(self.insert(devices).values(device=device[:128], first_seen=now, tags=[], groups=[], **values)
                   .on_conflict_do_update(index_elements=[devices.c.device], set_=values, where=guard))

    @staticmethod
    def _message_row(device: str, message: dict, now: float, text: str | None = None) -> tuple:
        """(device, boot, seq, kind, event, ts, received, message, text): the columns, the parsed body
        and its JSON text (None: encoded at insert)."""
        try:
            seq = int(message.get("seq", -1))
        except (TypeError, ValueError, OverflowError):
            seq = -1
        if not -2 ** 62 < seq < 2 ** 62:
            seq = -1
        ts = _number(message.get("ts"), None)
        if ts is not None and not 0 <= ts < 1e11:  # a clock far off (or garbage): the minute is ours
            ts = None
        return (device[:128], _clean(message.get("boot"), 64), seq, _clean(message.get("kind"), 16),
                _clean(message["event"], 64) if message.get("event") else None, ts, now, message, text)

    def _roll_up(self, db, telemetry: list[dict], now: float) -> None:
        sums: dict[tuple, dict] = {}
        classes: dict[tuple, int] = {}
        shadows: dict[tuple, tuple] = {}
        for row in telemetry:
            models = row[7].get("models")
            if not isinstance(models, dict):
                continue
            minute = int((row[5] or now) // 60)
            for name, entry in models.items():
                if not isinstance(entry, dict) or not isinstance(entry.get("version"), str):
                    continue
                counts = entry.get("requests") if isinstance(entry.get("requests"), dict) else {}
                ok, errors = int(_number(counts.get("ok"))), int(_number(counts.get("error")))
                latency = entry.get("latency_s") if isinstance(entry.get("latency_s"), dict) else {}
                p95 = _number(latency.get("p95"), None)
                drifted = _drifted(entry.get("drift"))
                key = (row[0], _clean(name, 128), _clean(entry["version"], 64), minute)
                total = sums.setdefault(key, {"requests": 0, "errors": 0, "p95_weighted": 0.0, "p95_requests": 0,
                                              "drift_messages": 0, "drifted_messages": 0})
                total["requests"] += ok + errors
                total["errors"] += errors
                if p95 is not None:
                    total["p95_weighted"] += p95 * (ok + errors)
                    total["p95_requests"] += ok + errors
                total["drift_messages"] += drifted is not None
                total["drifted_messages"] += bool(drifted)
                shadow = _shadow_row(entry.get("shadow"), row[5] or now)
                if shadow is not None:
                    shadow_key = (row[0], key[1], shadow[0], minute)
                    if shadow_key not in shadows or shadows[shadow_key][-1] <= shadow[-1]:
                        shadows[shadow_key] = shadow[1:]
                predictions = entry.get("predictions")
                if isinstance(predictions, dict):
                    for label, count in list(predictions.items())[:256]:
                        count = int(_number(count))
                        if count > 0:
                            label = _clean(label, 64)
                            classes[key + (label,)] = classes.get(key + (label,), 0) + count
        if sums:
            db.exec_driver_sql(self._sql(_ROLLUPS_UPSERT), [key + tuple(total[c] for c in _SUMS) for key, total in sums.items()])
        if classes:
            db.exec_driver_sql(self._sql(_CLASSES_UPSERT), [key + (count,) for key, count in classes.items()])
        if shadows:
            db.exec_driver_sql(self._sql(_SHADOW_UPSERT), [key + values for key, values in shadows.items()])

    def record_state(self, device: str, state: dict) -> None:
        self.store_batch([(device, "state", state)])

    def record_message(self, device: str, message: dict) -> bool:
        """Store one telemetry/event message; False when it was a duplicate."""
        before = self.duplicates
        self.store_batch([(device, str(message.get("kind")), message)])
        return self.duplicates == before

    def purge(self, keep_raw_s: float, keep_rollups_s: float) -> int:
        """Delete raw messages older than ``keep_raw_s`` and rollups older than ``keep_rollups_s``."""
        now = time.time()
        with self.engine.begin() as db:
            gone = db.execute(delete(messages).where(messages.c.received < now - keep_raw_s)).rowcount
            oldest = int((now - keep_rollups_s) // 60)
            db.execute(delete(rollups).where(rollups.c.minute < oldest))
            db.execute(delete(rollup_classes).where(rollup_classes.c.minute < oldest))
            db.execute(delete(tables.rollup_shadow).where(tables.rollup_shadow.c.minute < oldest))
        return gone

    # -- reading -----------------------------------------------------------------------------------

    def devices(self) -> list[dict]:
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(select(devices).order_by(devices.c.device))]

    def device(self, device: str) -> dict | None:
        with self.engine.connect() as db:
            row = db.execute(select(devices).where(devices.c.device == device)).first()
        return dict(row._mapping) if row else None

    def messages(self, device: str | None = None, kind: str | None = None, limit: int = 1000) -> list[dict]:
        query = select(messages).order_by(messages.c.id.desc()).limit(limit)
        if device:
            query = query.where(messages.c.device == device)
        if kind:
            query = query.where(messages.c.kind == kind)
        with self.engine.connect() as db:
            rows = [dict(r._mapping) for r in db.execute(query)]
        return rows[::-1]

    def message_count(self) -> int:
        with self.engine.connect() as db:
            return db.execute(select(func.count()).select_from(messages)).scalar_one()

    # -- assigned on the controller ----------------------------------------------------------------

    def label(self, column: str, device_ids: list[str], add: list[str], remove: list[str]) -> list[dict]:
        """Add/remove tags or groups (``column``) of devices; unknown devices are registered (so a
        device can be grouped before it first connects). Returns the devices' rows."""
        now = time.time()
        changed = []
        with self.engine.begin() as db:
            for device in device_ids:
                db.execute(self.insert(devices).values(device=device, online=False, first_seen=now, tags=[], groups=[])
                           .on_conflict_do_nothing())
                row = db.execute(select(devices).where(devices.c.device == device).with_for_update()).first()
                values = [v for v in (getattr(row, column) or []) if v not in remove]
                values += [v for v in add if v not in values]
                db.execute(update(devices).where(devices.c.device == device).values(**{column: sorted(values)}))
                changed.append(device)
        from .db import chunked

        with self.engine.connect() as db:
            rows = [dict(r._mapping) for part in chunked(changed)
                    for r in db.execute(select(devices).where(devices.c.device.in_(part)))]
        return sorted(rows, key=lambda r: r["device"])


def device_groups(row: dict) -> set[str]:
    """A device's groups: assigned on the controller, and the ones it subscribes to (``updates.groups``)."""
    reported = (row.get("state") or {}).get("groups") or []
    return set(row.get("groups") or []) | {g for g in reported if isinstance(g, str)}


def dumps(rows) -> str:
    return json.dumps(rows, indent=1, default=str)
