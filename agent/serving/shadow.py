"""A candidate version in shadow: it sees the inputs the active version answered, off the request path,
and is compared with it.

Bounded three ways, so the shadow can never cost an answer: a short queue that drops shadow work when
full (the request path only appends, or drops, under a lock), one low-priority thread (nice 19: the
kernel runs the active version's threads first), and a CPU share (after a run that took ``t`` seconds
of CPU the thread rests ``t * (1 / cpu_share - 1)``). A candidate that raises, returns NaN or hangs
is counted, never seen by a client: a run past ``timeout_s`` marks it hung and nothing more is
mirrored until it returns.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time

import numpy as np

from .agreement import Agreement

log = logging.getLogger("edgepack.agent.serving")
#: run times kept for the latency percentiles
LATENCY_WINDOW = 512


class ShadowRunner:
    """Runs ``served`` (a ServedVersion) on mirrored requests of ``active``; :meth:`summary` says how
    it compares. The request path only calls :meth:`wants`, :meth:`offer` and :meth:`abandon`, which
    touch a counter and a deque under a lock held for no more than that; the comparison's numbers are
    published by the shadow thread as a finished snapshot."""

    #: sha256 of the bundle when the fleet attached this shadow (a rollout's shadow stage); None from agent.yaml
    fleet_sha256: str | None = None

    def __init__(self, model_name: str, served, options, metrics=None, active=None):
        self.model_name = model_name
        self.served = served
        self.options = options
        self.metrics = metrics
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._pending: collections.deque = collections.deque()
        self._claimed = 0  # requests that wants() let through and that have not been offered yet
        self._counts: collections.Counter = collections.Counter()
        self._run_seconds: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
        self._cpu = 0.0
        self._started = time.monotonic()
        self._running_since: float | None = None
        self._closing = False
        self._failed: str | None = None
        self.last_error: str | None = None
        self.reset(active)
        self._thread = threading.Thread(target=self._loop, name=f"shadow-{model_name}", daemon=True)
        self._thread.start()

    def reset(self, active) -> None:
        """Compare with ``active`` (a ServedVersion) from now on: a new active version starts new sums."""
        outputs = active.model.outputs if active is not None else self.served.model.outputs
        with self._lock:
            self.active = active
            self._agreement = Agreement([spec.name for spec in outputs], self.options.confident_margin)
            self._generation = getattr(self, "_generation", 0) + 1
            self._pending.clear()
            self._snapshot = self._agreement.summary()

    @property
    def version(self) -> str:
        return self.served.version

    @property
    def counts(self) -> dict:
        with self._lock:
            return collections.Counter(self._counts)

    @property
    def hung(self) -> bool:
        since = self._running_since
        return since is not None and time.monotonic() - since > self.options.timeout_s

    def wants(self, samples: int) -> bool:
        """Whether to mirror a request of ``samples`` samples; True claims a place in the queue, given
        back by :meth:`offer` or :meth:`abandon` (called on the request path: cheap)."""
        if self._closing or self._failed:
            return False
        if samples > self.options.max_samples:
            self._count("skipped")
            return False
        if self.options.sample_rate < 1 and random.random() >= self.options.sample_rate:
            return False
        with self._lock:
            if self.hung or len(self._pending) + self._claimed >= self.options.queue:
                self._count_locked("dropped")
                return False
            self._claimed += 1
        return True

    def abandon(self) -> None:
        """Give back a claimed place (the request failed, or was answered by another version)."""
        with self._lock:
            self._claimed -= 1

    def offer(self, feeds: dict, outputs: dict) -> None:
        """Queue one answered request: its inputs and the active version's outputs (neither is written
        to afterwards)."""
        with self._lock:
            self._claimed -= 1
            if self._closing:
                return
            self._pending.append((feeds, outputs, self._generation))
            self._count_locked("offered")
            self._ready.notify()

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._count_locked(outcome)

    def _count_locked(self, outcome: str) -> None:
        self._counts[outcome] += 1
        if self.metrics is not None:
            self.metrics.shadow_requests.labels(self.model_name, self.version, outcome).inc()

    def _loop(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        except (OSError, AttributeError):
            pass
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._ready.wait()
                closing = self._closing
                if not closing:
                    feeds, outputs, generation = self._pending.popleft()
                    agreement = self._agreement if generation == self._generation else None
            if closing:
                self._retire()  # when close() could not (a run was still under way)
                return
            try:
                self._run_one(feeds, outputs, generation, agreement)
            except Exception as exc:  # noqa: BLE001 - a bug of the comparison stops the shadow, not the daemon
                self._running_since = None
                self._failed = self.last_error = f"{type(exc).__name__}: {_line(exc)}"
                self._count("errors")
                log.error("shadow stopped", extra={"model": self.model_name, "version": self.version,
                                                   "error": self._failed})
                return
            del feeds, outputs

    def _run_one(self, feeds: dict, outputs: dict, generation: int, agreement: Agreement | None) -> None:
        model = self.served.model
        cpu_before, began = time.thread_time(), time.perf_counter()
        self._running_since = time.monotonic()
        try:
            candidate = model.run(feeds, self.options.max_samples)
        except Exception as exc:  # noqa: BLE001 - the candidate's failure is a number, not the daemon's
            self._running_since = None
            self._count("errors")
            self.last_error = f"{type(exc).__name__}: {_line(exc)}"
            self.served.health.failed(feeds)
            self._rest(time.thread_time() - cpu_before)
            return
        self._running_since = None
        took = time.perf_counter() - began
        samples = max(1, model.backend.count(feeds)) if model.backend.batched else 1
        self._run_seconds.append(took / samples)
        self.served.health.observe(samples, took)
        if any(np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all() for v in candidate.values()):
            self._count("nonfinite")
        active = self.active
        _, reference = (active.model if active is not None else model).leading(feeds, outputs)
        _, candidate = model.leading(feeds, candidate)
        if agreement is not None:  # not a request of the version replaced meanwhile
            agreement.update(reference, candidate)  # this thread only: no lock held
            snapshot = agreement.summary()
            with self._lock:
                if generation == self._generation:
                    self._snapshot = snapshot
        self._count("compared")
        if self.metrics is not None:
            self.metrics.shadow_seconds.labels(self.model_name, self.version).observe(took)
            if self._snapshot["agreement"] is not None:
                self.metrics.shadow_agreement.labels(self.model_name, self.version).set(self._snapshot["agreement"])
        self._rest(time.thread_time() - cpu_before)

    def _rest(self, cpu: float) -> None:
        """Keep the thread's CPU under ``cpu_share`` of one core."""
        self._cpu += cpu
        share = self.options.cpu_share
        if share < 1 and cpu > 0:
            with self._lock:
                self._ready.wait_for(lambda: self._closing, timeout=cpu * (1 / share - 1))

    @property
    def state(self) -> str:
        """running, hung (a run past timeout_s) or failed (the comparison broke)."""
        return "failed" if self._failed else "hung" if self.hung else "running"

    def summary(self) -> dict:
        """What telemetry, /metrics and a rollout read: counts, agreement, the candidate's time per sample
        (the active version's is in its health summary)."""
        with self._lock:
            snapshot, counts = self._snapshot, dict(self._counts)
        body = {"version": self.version, "state": self.state, "requests": {k: v for k, v in counts.items() if v},
                "agreement": snapshot["agreement"], "outputs": snapshot["outputs"],
                "latency_s": percentiles(list(self._run_seconds)),
                "cpu_share": round(self._cpu / max(1e-9, time.monotonic() - self._started), 4)}
        if self.active is not None:
            body["active"] = self.active.version
        if self.last_error:
            body["last_error"] = self.last_error
        return body

    def close(self) -> None:
        """Stop; the candidate closes once its thread is done (a hung run is left to its daemon thread)."""
        with self._lock:
            self._closing = True
            self._pending.clear()
            self._ready.notify_all()
        self._thread.join(timeout=0.2)
        if not self._thread.is_alive():
            self._retire()

    def _retire(self) -> None:
        """Close the candidate once, from close() or from the thread ending after it."""
        with self._lock:
            if getattr(self, "_retired", False):
                return
            self._retired = True
        self.served.retire()


def _line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:200] if text else ""


def percentiles(values) -> dict:
    """p50 and p95 of ``values`` (empty: {})."""
    ordered = sorted(values)
    if not ordered:
        return {}
    return {"p50": ordered[len(ordered) // 2], "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}
