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
    """Runs ``served`` (a ServedVersion) on mirrored requests; :meth:`summary` says how it compares."""

    def __init__(self, model_name: str, served, options, metrics=None):
        self.model_name = model_name
        self.served = served
        self.options = options
        self.metrics = metrics
        self.agreement = Agreement([spec.name for spec in served.model.outputs], options.confident_margin)
        self.counts = collections.Counter()  # offered, compared, dropped, errors, nonfinite, skipped
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._run_seconds: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
        self._cpu = 0.0
        self._started = time.monotonic()
        self._running_since: float | None = None
        self._closing = False
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name=f"shadow-{model_name}", daemon=True)
        self._thread.start()

    @property
    def version(self) -> str:
        return self.served.version

    @property
    def hung(self) -> bool:
        since = self._running_since
        return since is not None and time.monotonic() - since > self.options.timeout_s

    def wants(self, samples: int) -> bool:
        """Whether to mirror a request of ``samples`` samples (called on the request path: cheap)."""
        if self._closing or samples > self.options.max_samples:
            return False
        if self.options.sample_rate < 1 and random.random() >= self.options.sample_rate:
            return False
        if self.hung or len(self._pending) >= self.options.queue:
            self._count("dropped")
            return False
        return True

    def offer(self, feeds: dict, outputs: dict) -> None:
        """Queue one answered request: its (copied) inputs and the active version's outputs."""
        with self._lock:
            if len(self._pending) >= self.options.queue:
                self._count("dropped")
                return
            self._pending.append((feeds, outputs))
            self._ready.notify()
        self._count("offered")

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
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
                if self._closing:
                    return
                feeds, outputs = self._pending.popleft()
            self._run_one(feeds, outputs)
            del feeds, outputs

    def _run_one(self, feeds: dict, outputs: dict) -> None:
        model = self.served.model
        cpu_before, began = time.thread_time(), time.perf_counter()
        self._running_since = time.monotonic()
        try:
            candidate = model.run(feeds, self.options.max_samples)
        except Exception as exc:  # noqa: BLE001 - the candidate's failure is a number, not the daemon's
            self._running_since = None
            self._count("errors")
            self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
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
        _, reference = model.leading(feeds, outputs)
        _, candidate = model.leading(feeds, candidate)
        with self._lock:
            self.agreement.update(reference, candidate)
        self._count("compared")
        if self.metrics is not None:
            self.metrics.shadow_seconds.labels(self.model_name, self.version).observe(took)
            value = self.agreement.summary()["agreement"]
            if value is not None:
                self.metrics.shadow_agreement.labels(self.model_name, self.version).set(value)
        self._rest(time.thread_time() - cpu_before)

    def _rest(self, cpu: float) -> None:
        """Keep the thread's CPU under ``cpu_share`` of one core."""
        self._cpu += cpu
        share = self.options.cpu_share
        if share < 1 and cpu > 0:
            with self._lock:
                self._ready.wait_for(lambda: self._closing, timeout=cpu * (1 / share - 1))

    def summary(self) -> dict:
        """What telemetry, /metrics and a rollout read: counts, agreement, the candidate's time per sample
        (the active version's is in its health summary)."""
        with self._lock:
            agreement = self.agreement.summary()
        body = {"version": self.version, "state": "hung" if self.hung else "running",
                "requests": {k: v for k, v in self.counts.items() if v},
                "agreement": agreement["agreement"], "outputs": agreement["outputs"],
                "latency_s": percentiles(self._run_seconds),
                "cpu_share": round(self._cpu / max(1e-9, time.monotonic() - self._started), 4)}
        if self.last_error:
            body["last_error"] = self.last_error
        return body

    def close(self) -> None:
        """Stop (a hung run is left to its daemon thread) and let go of the candidate."""
        with self._lock:
            self._closing = True
            self._pending.clear()
            self._ready.notify_all()
        self._thread.join(timeout=1.0)
        self.served.retire()


def percentiles(values) -> dict:
    """p50 and p95 of ``values`` (empty: {})."""
    ordered = sorted(values)
    if not ordered:
        return {}
    return {"p50": ordered[len(ordered) // 2], "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}
