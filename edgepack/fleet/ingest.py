"""Ingest workers: telemetry and events stored by several processes of one controller.

One controller process stores what paho hands it on one core: paho's receive path and the writer
share the GIL, so on a 2-core machine the second core idles while ingestion saturates the first.
``edgepack fleet serve --ingest-workers N`` starts N worker processes instead, each a persistent MQTT
session of its own (client id ``<controller id>-ingest-<k>``) in one MQTT 5 shared subscription
(``$share/<group>/…/telemetry`` and ``…/events``): the broker splits the messages between them, each
stores its share and acknowledges it after the commit, exactly as the single process does. The
controller process keeps states, desired states, chunk requests and the rollout tick.

A worker that dies is started again with the same client id, so its persistent session — and what
the broker queued for it meanwhile (Mosquitto 2.0.11 keeps handing a share's messages to a member
that is away) — is picked up where it stopped. Workers die with the controller: a ``kill -9`` of the
controller sends them SIGTERM (``PR_SET_PDEATHSIG``), and they drain and stop, so a restarted
controller's workers never fight orphans over their sessions.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger("edgepack.fleet")


def share_group(client_id: str, share: str) -> str:
    """The shared-subscription group of a controller's ingest workers: ``edgepack`` when telemetry is
    split between controllers too (``--share all``), else one group per controller (each controller
    still gets every message, and stores it once)."""
    if share == "all":
        return "edgepack"
    return "edgepack-" + re.sub(r"[^A-Za-z0-9_.-]", "_", client_id)[:80]


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the controller process goes, however it goes (elsewhere: the
    watchdog thread of :func:`_worker` notices a new parent)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(broker, db_url: str | None, bundles: str, client_id: str, group: str, parent: int, ready,
            retire: bool = False) -> None:
    from .controller import FleetController

    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [{client_id}] %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if os.getppid() != parent:
        return  # the controller went before this worker could ask to follow it
    threading.Thread(target=_exit_after_drain, args=(stop, client_id), name="ingest-deadline", daemon=True).start()

    def watchdog() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=watchdog, name="ingest-watchdog", daemon=True).start()
    controller = FleetController(broker, db_url, Path(bundles), client_id=client_id, role="ingest", ingest_share=group,
                                 retire=retire)

    def report() -> None:  # the controller process waits for this before it takes its own subscriptions
        while not stop.is_set():
            if controller.connected.wait(0.5):
                ready.set()
                return

    def idle() -> None:  # a retiring worker stops once its session's queue stopped coming
        while not stop.wait(0.5):
            if (controller.connected.is_set() and controller.inbox.empty() and controller.taken == 0
                    and time.monotonic() - controller.last_message > RETIRE_IDLE_S):
                stop.set()

    threading.Thread(target=report, name="ingest-ready", daemon=True).start()
    if retire:
        threading.Thread(target=idle, name="ingest-retire", daemon=True).start()
    controller.serve(stop)
    if retire and not controller.retired:
        raise SystemExit(1)  # its session keeps what it did not store: retired again at the next start


#: a stopped worker that is still draining after this long exits anyway
DRAIN_S = 15.0


def _exit_after_drain(stop: threading.Event, client_id: str) -> None:
    """Bound the drain of a stopped worker: a store stuck on a busy database must not keep it alive
    past its controller (a restarted controller's worker would find its session taken). What it did
    not acknowledge stays with the broker, and a batch is one transaction: nothing is lost or doubled."""
    stop.wait()
    time.sleep(DRAIN_S)
    # The exit must not wait on the log: a handler stuck writing to a full stderr pipe holds its lock.
    threading.Timer(2.0, os._exit, (1,)).start()
    log.warning("%s: still draining %.0f s after the stop; exiting, the broker keeps what was not acknowledged",
                client_id, DRAIN_S)
    logging.shutdown()
    os._exit(1)


#: a retiring worker ends its session after this long without a message
RETIRE_IDLE_S = 3.0


class IngestWorkers:
    """``count`` worker processes storing telemetry and events; restarted when one dies."""

    #: a worker that keeps dying is started again at most this often
    RESTART_S = 1.0

    def __init__(self, broker, db_url: str | None, bundles: Path, client_id: str, count: int, share: str = "none"):
        self.broker, self.db_url, self.bundles = broker, db_url, str(bundles)
        # one "worker" is the controller process itself: no worker process, only a surplus to retire
        self.ids = [f"{client_id}-ingest-{k}"[:128] for k in range(count)] if count > 1 else []
        self.group = share_group(client_id, share)
        self.processes: dict[str, multiprocessing.Process] = {}
        self.restarts = 0
        self.ready: dict[str, object] = {}
        #: workers of an earlier run with more of them: draining their sessions, then ending them
        self.retiring: dict[str, multiprocessing.Process] = {}
        self.client_id, self.count = client_id, count
        self._context = multiprocessing.get_context("spawn")  # no copy of the controller's threads and sockets
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    def _start(self, client_id: str, retire: bool = False) -> None:
        ready = self.ready.setdefault(client_id, self._context.Event())
        process = self._context.Process(target=_worker, name=client_id, daemon=True,
                                        args=(self.broker, self.db_url, self.bundles, client_id, self.group, os.getpid(),
                                              ready, retire))
        process.start()
        (self.retiring if retire else self.processes)[client_id] = process

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until every worker's subscription is confirmed: the controller connects after that, so
        once it stores a device's state its telemetry has somewhere to go (a first start loses
        nothing the single-process controller would not)."""
        deadline = time.monotonic() + timeout
        return all(event.wait(max(0.0, deadline - time.monotonic())) for event in self.ready.values())

    def start(self) -> "IngestWorkers":
        surplus = self._surplus()
        # With no surplus to retire, this run's count is recorded before its workers take a message: a
        # controller stopped within a second of starting (the supervisor's first round) left the old
        # count behind, and the next run with fewer workers never drained the sessions of the others.
        recorded = not surplus and self._record()
        for client_id in self.ids:
            self._start(client_id)
        for client_id in surplus:
            self._start(client_id, retire=True)
        self._supervisor = threading.Thread(target=self._supervise, args=(recorded,), name="ingest-supervisor",
                                            daemon=True)
        self._supervisor.start()
        return self

    def _record(self) -> bool:
        try:
            record_worker_count(self.db_url, self.client_id, self.count)
            return True
        except Exception:  # noqa: BLE001 - the database away: the supervisor's next round tries again
            log.exception("could not record the ingest worker count")
            return False

    def _surplus(self) -> list[str]:
        """Client ids of workers an earlier run had beyond this one's count (recorded in the database):
        their sessions stay in the share, and Mosquitto keeps handing them messages, until ended."""
        before = worker_count(self.db_url, self.client_id)
        return [f"{self.client_id}-ingest-{k}"[:128] for k in range(len(self.ids), before)]

    def _supervise(self, recorded: bool = False) -> None:
        while not self._stop.wait(self.RESTART_S):
            if not recorded and all(not p.is_alive() for p in self.retiring.values()):
                failed = [c for c, p in self.retiring.items() if p.exitcode != 0]
                if failed:  # tried again at the next start
                    log.warning("ingest workers %s did not end their sessions", ", ".join(failed))
                    recorded = True
                else:
                    recorded = self._record()
            for client_id, process in list(self.processes.items()):
                if not process.is_alive() and not self._stop.is_set():
                    log.warning("ingest worker %s exited (%s); starting it again", client_id, process.exitcode)
                    self.restarts += 1
                    self._start(client_id)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM every worker (each stores and acknowledges what it took, then stops) and wait."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        everyone = [*self.processes.values(), *self.retiring.values()]
        for process in everyone:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in everyone:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()  # what it did not acknowledge stays with the broker for its session
                process.join(5)


def _key(client_id: str) -> str:
    return f"ingest-workers/{client_id}"[:64]


def worker_count(db_url: str | None, client_id: str) -> int:
    """How many ingest workers the controller ``client_id`` last ran with (0: none recorded)."""
    from sqlalchemy import select

    from .db import leases, open_engine

    engine = open_engine(db_url)
    try:
        with engine.connect() as db:
            value = db.execute(select(leases.c.until).where(leases.c.name == _key(client_id))).scalar()
    finally:
        engine.dispose()
    return int(value or 0)


def record_worker_count(db_url: str | None, client_id: str, count: int) -> None:
    """Record that ``client_id`` runs ``count`` ingest workers (1: none), once the surplus of an
    earlier run ended their sessions; kept in the leases table (a row per controller)."""
    from .db import insert_for, leases, open_engine

    engine = open_engine(db_url)
    try:
        insert = insert_for(engine)
        with engine.begin() as db:
            db.execute(insert(leases).values(name=_key(client_id), owner=None, until=float(count))
                       .on_conflict_do_update(index_elements=[leases.c.name], set_={"until": float(count)}))
    finally:
        engine.dispose()
