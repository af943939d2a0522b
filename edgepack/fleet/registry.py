"""The fleet controller's records, behind SQLAlchemy Core: a SQLite file by default, PostgreSQL when
several controllers share a fleet. Telemetry and events are unique per (device, boot, seq), so a
message delivered twice (at-least-once MQTT, resent from a device's spool) is stored once.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import (JSON, Boolean, Column, Float, Integer, MetaData, String, Table, UniqueConstraint,
                        create_engine, insert, select, update)
from sqlalchemy.exc import IntegrityError

metadata = MetaData()

devices = Table(
    "devices", metadata,
    Column("device", String(128), primary_key=True),
    Column("online", Boolean, nullable=False, default=False),
    Column("profile", String(64)),
    Column("state", JSON),
    Column("last_seen", Float),
)

messages = Table(
    "messages", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device", String(128), nullable=False, index=True),
    Column("boot", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("event", String(64)),
    Column("ts", Float),
    Column("received", Float),
    Column("body", JSON),
    UniqueConstraint("device", "boot", "seq", name="one_message"),
)


def default_db() -> str:
    return "sqlite:///fleet.db"


class FleetRegistry:
    """Devices, their last reported state, and every telemetry/event message once."""

    def __init__(self, url: str | None = None):
        self.engine = create_engine(url or default_db())
        metadata.create_all(self.engine)
        self.duplicates = 0

    def record_state(self, device: str, state: dict) -> None:
        values = {"online": bool(state.get("online")), "profile": state.get("profile"), "state": state,
                  "last_seen": time.time()}
        with self.engine.begin() as db:
            changed = db.execute(update(devices).where(devices.c.device == device).values(**values)).rowcount
            if not changed:
                db.execute(insert(devices).values(device=device, **values))

    def record_message(self, device: str, message: dict) -> bool:
        """Store a telemetry/event message; False when it was a duplicate."""
        row = {"device": device, "boot": str(message.get("boot")), "seq": int(message.get("seq", -1)),
               "kind": str(message.get("kind")), "event": message.get("event"), "ts": message.get("ts"),
               "received": time.time(), "body": message}
        try:
            with self.engine.begin() as db:
                db.execute(insert(messages).values(**row))
        except IntegrityError:
            self.duplicates += 1
            return False
        return True

    def devices(self) -> list[dict]:
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(select(devices).order_by(devices.c.device))]

    def messages(self, device: str | None = None, kind: str | None = None, limit: int = 1000) -> list[dict]:
        query = select(messages).order_by(messages.c.id.desc()).limit(limit)
        if device:
            query = query.where(messages.c.device == device)
        if kind:
            query = query.where(messages.c.kind == kind)
        with self.engine.connect() as db:
            rows = [dict(r._mapping) for r in db.execute(query)]
        return rows[::-1]


def dumps(rows) -> str:
    return json.dumps(rows, indent=1, default=str)
