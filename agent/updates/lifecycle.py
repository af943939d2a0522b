"""The update lifecycle of one model in the store: one state enum, one transition table, one ``step``.

A model's ``state.json`` holds its slots, the active and previous slot, and an ``update`` record whose
``state`` is one of :class:`UpdateState`. The store writes the record returned by :func:`step`
durably (temp file, fsync, rename, fsync of the folder) **before** the side effect the new state
stands for, so after a crash or power cut :func:`recovery_event` says how to resume, and every path
ends in exactly one of: the old model active, or the new one committed.

==============  ====================================================  ===============================
state           what is happening (side effect after the write)       after a crash (``restart``)
==============  ====================================================  ===============================
idle            nothing; ``result`` says how the last update ended     stays idle
downloading     chunks of the new bundle are written to disk           resumes (only missing chunks)
staging         the bundle is verified, extracted into ``staging/``,   staging is removed; idle (the
                fsynced, loaded and smoke-tested                       download is kept: no refetch)
switching       ``staging/`` replaces the inactive slot (on            idle, the old model active
                ``reactivate``: the intact bundle already there);
                the active pointer still names the old model
probation       the pointer names the new model (old = previous);     rolling_back: a restart here
                the daemon serves it and watches its health            counts as a failure
rolling_back    the pointer names the old model again; the new slot   rolling_back (finished again)
                is removed (kept on a clean stop, for ``reactivate``)
==============  ====================================================  ===============================

:data:`RESUME` says the same per state, for the code and the README.
"""

from __future__ import annotations

import time
from enum import Enum

#: version of the state.json layout; readers refuse newer ones
SCHEMA = 2
#: transitions kept in the record's history (the full list goes out as events)
HISTORY = 20


class UpdateState(str, Enum):
    """Where a model's update lifecycle stands (persisted as the enum's value)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    STAGING = "staging"
    SWITCHING = "switching"
    PROBATION = "probation"
    ROLLING_BACK = "rolling_back"


class Event(str, Enum):
    """What happens to a model's update (the second key of :data:`TRANSITIONS`)."""

    DOWNLOAD = "download"
    INSTALL = "install"
    REACTIVATE = "reactivate"
    RESTART = "restart"
    ROLLBACK = "rollback"
    DOWNLOADED = "downloaded"
    FAIL = "fail"
    CANCEL = "cancel"
    STAGED = "staged"
    SWITCHED = "switched"
    COMMIT = "commit"
    REGRESSED = "regressed"
    ROLLED_BACK = "rolled_back"


S = UpdateState
#: (state, event) -> next state; any other pair is a bug in the caller and raises
TRANSITIONS: dict[tuple[UpdateState, str], UpdateState] = {
    (S.IDLE, "download"): S.DOWNLOADING,      # an accepted desired state names a bundle to fetch
    (S.IDLE, "install"): S.STAGING,           # a bundle file on this device (edgepack-agent install)
    (S.IDLE, "restart"): S.IDLE,
    (S.IDLE, "rollback"): S.IDLE,             # manual: the previous slot becomes active again
    (S.IDLE, "reactivate"): S.SWITCHING,      # over the air: the wanted bundle is in the other slot already
    (S.DOWNLOADING, "downloaded"): S.STAGING,
    (S.DOWNLOADING, "fail"): S.IDLE,
    (S.DOWNLOADING, "cancel"): S.IDLE,        # a newer desired state replaced this one
    (S.DOWNLOADING, "restart"): S.DOWNLOADING,
    (S.STAGING, "staged"): S.SWITCHING,
    (S.STAGING, "fail"): S.IDLE,
    (S.STAGING, "restart"): S.IDLE,
    (S.SWITCHING, "switched"): S.PROBATION,   # over the air: the daemon must now load and watch it
    (S.SWITCHING, "commit"): S.IDLE,          # local install: loaded and smoke-tested already
    (S.SWITCHING, "fail"): S.IDLE,
    (S.SWITCHING, "restart"): S.IDLE,
    (S.PROBATION, "commit"): S.IDLE,
    (S.PROBATION, "regressed"): S.ROLLING_BACK,
    (S.PROBATION, "restart"): S.ROLLING_BACK,
    (S.ROLLING_BACK, "rolled_back"): S.IDLE,
    (S.ROLLING_BACK, "restart"): S.ROLLING_BACK,
}

#: what a process that finds a model in each state after a crash does, and why (the ``restart`` event)
RESUME: dict[UpdateState, str] = {
    S.IDLE: "nothing was under way",
    S.DOWNLOADING: "the chunks on disk are kept and only the missing ones are fetched (a daemon with "
                   "updates on); without an updater the download is cancelled",
    S.STAGING: "the old version is still active and the staged copy is a leftover: it is removed (the "
               "verified download is kept, so the update stages again without fetching anything)",
    S.SWITCHING: "the pointer still names the old version: the half-moved slot is removed",
    S.PROBATION: "the new version was serving when the process died: that counts against it, roll back",
    S.ROLLING_BACK: "a rollback never gives up halfway: finish it",
}
#: restarts during one target's update before it is given up (a bundle that kills the process)
MAX_RESTARTS = 3

#: the outcome an event records when it ends an update (shown in status and the retained state)
RESULTS = {"fail": "failed", "cancel": "cancelled", "commit": "committed", "rolled_back": "rolled_back",
           "restart": "interrupted"}


class TransitionError(RuntimeError):
    """An event that is not allowed in the current state (a programming error, not a user error)."""


def idle_record() -> dict:
    """The update record of a model that never had an update."""
    return {"state": S.IDLE.value, "since": time.time(), "target": None, "result": None, "reason": None,
            "history": []}


def step(update: dict, event: str, reason: str | None = None, **fields) -> dict:
    """The record after ``event`` happens in ``update``'s state; ``fields`` update the record
    (``target=...``). Pure: the caller persists the result before acting on it."""
    current = UpdateState(update["state"])
    event = Event(event).value if event in Event._value2member_map_ else event
    try:
        following = TRANSITIONS[(current, event)]
    except KeyError:
        raise TransitionError(f"event {event!r} is not allowed in state {current.value!r}") from None
    now = time.time()
    record = {**update, **fields, "state": following.value, "since": now, "reason": reason}
    if following is S.IDLE and current is not S.IDLE:
        record["result"] = RESULTS.get(event, event)
    elif current is S.IDLE and following is not S.IDLE:
        record["result"] = None
    entry = {"from": current.value, "to": following.value, "event": event, "at": now}
    if reason:
        entry["reason"] = reason
    record["history"] = (list(update.get("history", [])) + [entry])[-HISTORY:]
    return record


def recovery_event(update: dict) -> str | None:
    """The event to apply when a process finds ``update`` after a crash: ``restart``, or None when
    nothing was under way (idle)."""
    return None if UpdateState(update["state"]) is S.IDLE else "restart"
