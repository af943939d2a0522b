"""The fleet controller's tables, behind SQLAlchemy Core: a SQLite file by default (WAL, so the
controller's writer and the CLI's readers do not block each other), PostgreSQL when several
controllers share a fleet. Every write that two controllers could race on is one statement: an
upsert (``INSERT … ON CONFLICT``) or a conditional ``UPDATE``, never read-then-write.
"""

from __future__ import annotations

import time

from sqlalchemy import (JSON, BigInteger, Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event, update)

metadata = MetaData()
#: 64-bit on PostgreSQL (2**31 messages is days of a large fleet); SQLite's INTEGER is 64-bit already and
#: only ``INTEGER PRIMARY KEY`` autoincrements
Big = BigInteger().with_variant(Integer, "sqlite")

devices = Table(
    "devices", metadata,
    Column("device", String(128), primary_key=True),
    Column("online", Boolean, nullable=False, default=False),
    Column("profile", String(64)),
    #: the last full state the device reported (a Last Will only sets ``online``)
    Column("state", JSON),
    Column("last_seen", Float),
    Column("first_seen", Float),
    #: assigned on the controller (``edgepack fleet devices tag|group``)
    Column("tags", JSON),
    Column("groups", JSON),
)

messages = Table(
    "messages", metadata,
    Column("id", Big, primary_key=True, autoincrement=True),
    Column("device", String(128), nullable=False, index=True),
    Column("boot", String(64), nullable=False),
    Column("seq", Big, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("event", String(64)),
    Column("ts", Float),
    Column("received", Float, index=True),
    Column("body", JSON),
    UniqueConstraint("device", "boot", "seq", name="one_message"),
)

#: telemetry rolled up per device, model, version and minute: what the rollout metric gates read
rollups = Table(
    "rollups", metadata,
    Column("device", String(128), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("minute", Integer, primary_key=True),
    Column("requests", Big, nullable=False, default=0),
    Column("errors", Big, nullable=False, default=0),
    #: sum of (p95 of a telemetry message x its requests) and of those requests: a request-weighted p95
    Column("p95_weighted", Float, nullable=False, default=0.0),
    Column("p95_requests", Big, nullable=False, default=0),
    Column("drift_messages", Integer, nullable=False, default=0),
    Column("drifted_messages", Integer, nullable=False, default=0),
    Index("rollups_by_minute", "minute"),
)

rollup_classes = Table(
    "rollup_classes", metadata,
    Column("device", String(128), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("minute", Integer, primary_key=True),
    Column("label", String(64), primary_key=True),
    Column("count", Big, nullable=False, default=0),
)

#: the last shadow comparison each device reported per minute: cumulative since the candidate loaded
#: (a shadow stage and the dashboard read the latest row of each device)
rollup_shadow = Table(
    "rollup_shadow", metadata,
    Column("device", String(128), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),  # the candidate's
    Column("minute", Integer, primary_key=True),
    Column("active", String(64)),  # the version it was compared with
    Column("state", String(16)),  # running | hung | failed
    Column("samples", Big, nullable=False, default=0),
    Column("agreement", Float),
    Column("errors", Big, nullable=False, default=0),
    Column("latency_p95", Float),
    Column("ts", Float),
    Index("rollup_shadow_by_minute", "minute"),
)

#: every bundle the controller can send, by content
bundles = Table(
    "bundles", metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", Big, nullable=False),
    Column("name", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("profile", String(64), nullable=False),
    Column("chunk_bytes", Integer, nullable=False),
    #: the signed per-chunk digest list (base64), as desired states carry it
    Column("chunks", Text, nullable=False),
    Column("added", Float),
)

releases = Table(
    "releases", metadata,
    Column("name", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("notes", Text),
    Column("created", Float),
)

release_bundles = Table(
    "release_bundles", metadata,
    Column("name", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("profile", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False),
)

#: every desired state the fleet signed and published
desired = Table(
    "desired", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("topic", String(256), nullable=False, index=True),
    Column("desired_version", Integer, nullable=False, index=True),
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("rollout", Integer),
    Column("purpose", String(16), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created", Float),
    Column("expires_at", Float),
)

rollouts = Table(
    "rollouts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # rollout | rollback
    Column("name", String(128), nullable=False),
    Column("version", String(64)),
    Column("selector", JSON, nullable=False),
    Column("strategy", JSON, nullable=False),
    Column("criteria", JSON, nullable=False),
    Column("state", String(16), nullable=False),  # running | paused | aborted | done
    Column("stage", Integer, nullable=False, default=0),
    Column("stage_started", Float),
    Column("reason", Text),
    Column("verdicts", JSON),
    Column("created", Float),
    Column("updated", Float),
    Column("requested", String(16)),  # pause | resume | abort, set by the CLI, done by the tick
)

rollout_devices = Table(
    "rollout_devices", metadata,
    Column("rollout", Integer, primary_key=True),
    Column("device", String(128), primary_key=True),
    Column("profile", String(64)),
    Column("rank", Big, nullable=False),
    Column("stage", Integer),
    #: pending | offered | committed | failed | timed_out | skipped | rollback_offered | rolled_back
    Column("status", String(20), nullable=False),
    Column("from_version", String(64)),
    Column("to_version", String(64)),
    Column("offered_at", Float),
    Column("seen_at", Float),
    Column("finished_at", Float),
    Column("desired_version", Integer),
    Column("detail", Text),
)

#: a lease one controller holds to advance rollouts (hawkBit's scheduler lock)
leases = Table(
    "leases", metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(128)),
    Column("until", Float),
)


def default_db() -> str:
    return "sqlite:///fleet.db"


def open_engine(url: str | None = None):
    """An engine with the tables created; SQLite in WAL mode with a busy timeout."""
    url = url or default_db()
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]  # psycopg 3 (edgepack[fleet-pg]), not psycopg2
    sqlite = url.startswith("sqlite")
    from edgepack.errors import UsageError

    try:
        engine = create_engine(url, **({"connect_args": {"timeout": 30}} if sqlite else {"pool_pre_ping": True}))
    except Exception as exc:  # noqa: BLE001 - a URL of an unknown kind, a driver missing
        raise UsageError(f"--db {url!r}: {str(exc).splitlines()[0]} (give sqlite:///FILE or "
                         "postgresql://USER@HOST:PORT/DB with 'pip install edgepack[fleet-pg]')") from None
    if sqlite:
        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record):  # WAL: readers never wait for the writer; NORMAL: fsync at checkpoints
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
    try:
        metadata.create_all(engine)
        _add_late_indexes(engine)
    except Exception as exc:  # noqa: BLE001 - the database cannot be reached or opened
        raise UsageError(f"--db: cannot open the fleet database ({str(exc).splitlines()[0][:200]}); check the URL, "
                         "that the server runs, and for SQLite that the folder exists") from None
    return engine


#: indexes added after a table first shipped: created on databases made before them too
_LATE_INDEXES = [Index("uq_desired_version", desired.c.desired_version, unique=True)]


def _add_late_indexes(engine) -> None:
    import logging

    for index in _LATE_INDEXES:
        try:
            index.create(engine, checkfirst=True)
        except Exception as exc:  # noqa: BLE001 - e.g. duplicates signed before the index existed
            logging.getLogger("edgepack.fleet").warning("index %s not created: %s", index.name, str(exc).splitlines()[0][:200])


def insert_for(engine):
    """The dialect's ``insert`` (with ``on_conflict_do_update/nothing``): SQLite or PostgreSQL."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


#: ids per ``IN (…)`` list: PostgreSQL takes at most 65,535 bound parameters in one statement
IN_CHUNK = 10_000


def chunked(items, size: int | None = None):
    """``items`` in lists of at most ``size`` (for ``IN (…)`` lists over a fleet of any size)."""
    items, size = list(items), size or IN_CHUNK
    for start in range(0, len(items), size):
        yield items[start:start + size]


def take_lease(engine, name: str, owner: str, seconds: float) -> bool:
    """Hold ``name`` for ``seconds`` (renewed by the holder); one statement, so two controllers
    cannot both win."""
    now = time.time()
    insert = insert_for(engine)
    with engine.begin() as db:
        db.execute(insert(leases).values(name=name, owner=None, until=0.0).on_conflict_do_nothing())
        won = db.execute(update(leases).where(leases.c.name == name)
                         .where((leases.c.owner == owner) | (leases.c.until < now) | leases.c.owner.is_(None))
                         .values(owner=owner, until=now + seconds)).rowcount
    return bool(won)


def lease_held(db, name: str, owner: str) -> bool:
    """Whether ``owner`` still holds ``name``, read inside the caller's transaction (the fence of a
    write that only the holder may make). On PostgreSQL the row is locked until that transaction
    ends, so a takeover cannot commit between this check and the write it guards; on SQLite the
    caller holds the database's write lock already."""
    from sqlalchemy import select

    query = select(leases.c.owner).where(leases.c.name == name).where(leases.c.owner == owner).where(leases.c.until >= time.time())
    if db.dialect.name == "postgresql":
        query = query.with_for_update()
    return db.execute(query).first() is not None


def release_lease(engine, name: str, owner: str) -> None:
    with engine.begin() as db:
        db.execute(update(leases).where(leases.c.name == name).where(leases.c.owner == owner)
                   .values(owner=None, until=0.0))


def rollout_classes_query(model: str, device_ids, versions: list[str], since_minute: int):
    """Predicted-class counts of ``model`` at ``versions`` on ``device_ids`` (a list, or a SELECT of
    device ids for a cohort of any size) since a minute: (label, count) rows."""
    from sqlalchemy import func, select

    return (select(rollup_classes.c.label, func.sum(rollup_classes.c.count))
            .where(rollup_classes.c.model == model).where(rollup_classes.c.device.in_(device_ids))
            .where(rollup_classes.c.version.in_(versions)).where(rollup_classes.c.minute >= since_minute)
            .group_by(rollup_classes.c.label))
