"""Per-model request scheduling: admission control, dynamic batching, deadlines, version pinning.

All bookkeeping runs on the event loop thread; only the model runs on the model's worker threads
(ONNX Runtime and LiteRT release the GIL while they compute).

- **Admission.** The queue is bounded (``max_queue_size`` requests, by default what the model gets
  through in ``queue_budget_ms`` at the per-sample time of its recent runs, with one full batch per
  instance as the floor, so the queue follows the host's speed instead of the speed measured at load);
  a full queue answers at once with :class:`Overloaded` (HTTP 503 with ``Retry-After``), as Triton's
  ``max_queue_size`` does, instead of a queue that grows without end. A request admitted from its head
  holds a place (:meth:`reserve`) while its body is read and decoded, so a burst of heads cannot all
  pass a queue that is nearly full; a place counts for ``place_hold_ms`` at most, so slow uploads
  cannot hold the queue shut.
- **Overload.** A door that holds a refusal back (``server.refusal_delay_ms``: a client that sends again
  as soon as it is refused cannot make refusals at the loop's speed) asks :meth:`hold_refusal` for how
  long: about as long as makes the held clients come back at twice what the model serves, spread out
  (uniform 0.5-1.5x) so they do not come back together, and at most the configured delay. While the
  queue and the held clients are more than the full queue holds (an overload: an unpaced flood), the
  default queue admits only ``shed_queue_ms`` of work, so an admitted request waits for about one run
  instead of a whole queue ahead of it; the clients coming back keep the worker fed. A closed loop of
  clients the full queue holds is never refused, so it never sheds.
- **Deadlines.** A request may carry a deadline; queued work whose deadline passed is dropped with
  :class:`DeadlineExceeded` (504) before it costs a run. Work of a client that went away is cancelled
  and skipped the same way.
- **Version pinning.** A request is validated against one loaded version and holds it
  (:meth:`ServedVersion.acquire`); its batch runs on that version, merged only with requests pinned to
  the same one, so a swap never makes a new version compute an answer checked against the old one's
  specs. A retired version closes only after its queued and running work is done.
- **Batching.** Requests merge up to ``max_batch_size`` samples, never beyond a fixed batch, and never
  for a model whose outputs depend on the rest of the batch (``LoadedModel.merge_limit``). A request of
  more samples than one run takes runs a run's worth at a time, queueing again between chunks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from edgepack.tensors import all_finite

from ..config import ModelConfig
from ..model import LoadedModel
from .metrics import ServingMetrics

log = logging.getLogger("edgepack.agent.serving")

#: bounds of the default queue size (requests). The floor holds a normal client pool (tritonclient's
#: concurrency of 16, a thread pool of 32) on a host slowed by a CPU hog: a burst of that size is
#: load the device serves, not a flood to shed (8 refused a 16-connection client on a busy host).
MIN_QUEUE, MAX_QUEUE = 32, 4096
#: weight of the newest run in the running per-sample time the queue is sized from
LIVE_WEIGHT = 0.2
#: held refusals come back at about this many times what the model serves (more keeps a short queue fed
#: through the randomness of their returns; each return beyond what is served is one more refusal to write)
RETURN_FACTOR = 2.0
#: the shortest mean hold of a refusal, so a few refused clients do not spin
MIN_REFUSAL_HOLD_S = 0.01
#: a large request runs in chunks of about this much compute (at most CHUNK_SAMPLES samples, in as few
#: runtime calls as the model allows), yielding the model to waiting requests in between, so one huge
#: request shares the model with the small ones instead of holding it for seconds
CHUNK_SECONDS = 0.004
CHUNK_SAMPLES = 64
#: with dynamic batching, a batch waits for requests admitted from their head for at most this many
#: samples' run time (and never more than GATHER_MAX_S): see ModelScheduler._gather_held
GATHER_SAMPLES = 1.0
GATHER_MAX_S = 0.005


#: while the queue sheds, a place held for a body still arriving counts for this many runs' time
SHED_PLACE_RUNS = 4


class Place:
    """A queue place held by a request admitted from its head (see :meth:`ModelScheduler.reserve`)."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = time.perf_counter()


class Overloaded(Exception):
    """The model's queue is full; retry after ``retry_after`` seconds. ``scheduler``: the queue that
    refused (a door that holds the refusal back asks it how long: :meth:`ModelScheduler.hold_refusal`)."""

    def __init__(self, message: str, retry_after: int, scheduler: "ModelScheduler | None" = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.scheduler = scheduler


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch could run."""


class VersionHealth:
    """What a version's runs looked like: the figures an update's probation window compares.

    A run whose inputs lie far outside the calibration range (``ranges``: input name -> lowest and
    highest value accepted) is counted in ``excluded`` and not in ``errors`` or ``nonfinite``: an
    input of 3e38 overflows any model, and must not make a good version look broken."""

    #: how far beyond the calibration range (in widths of that range) an input still counts
    RANGE_WIDTHS = 10.0

    def __init__(self, ranges: dict | None = None) -> None:
        self.runs = 0
        self.samples = 0
        self.errors = 0
        self.nonfinite = 0  # runs whose outputs held NaN or Inf
        self.excluded = 0  # runs left out of the verdict: inputs far outside the calibration range
        self.seconds: collections.deque[float] = collections.deque(maxlen=512)  # per sample, per run
        self.run_seconds: collections.deque[float] = collections.deque(maxlen=512)
        self.ranges: dict[str, tuple[float, float]] = {}
        self.set_reference(ranges or {})

    def set_reference(self, ranges: dict) -> None:
        """Calibration ranges per input (lowest, highest), widened by :attr:`RANGE_WIDTHS`."""
        widened = {}
        for name, (low, high) in ranges.items():
            span = max(float(high) - float(low), abs(float(high)), abs(float(low)), 1e-6)
            widened[name] = (float(low) - self.RANGE_WIDTHS * span, float(high) + self.RANGE_WIDTHS * span)
        self.ranges = widened

    def out_of_range(self, feeds: dict | None) -> bool:
        """Whether any input value lies outside its widened calibration range (or is not finite)."""
        if not feeds or not self.ranges:
            return False
        for name, (low, high) in self.ranges.items():
            value = feeds.get(name)
            if value is None or not getattr(value, "size", 0) or value.dtype.kind not in "fiu":
                continue
            with np.errstate(invalid="ignore"):
                if not (low <= np.min(value) and np.max(value) <= high):
                    return True
        return False

    def observe(self, samples: int, seconds: float) -> None:
        self.runs += 1
        self.samples += samples
        self.run_seconds.append(seconds)
        if samples:
            self.seconds.append(seconds / samples)

    def check_outputs(self, outputs: dict, feeds: dict | None = None) -> None:
        """Count a run whose outputs hold NaN or Inf (called on the worker thread, off the event loop);
        with ``feeds``, a run on inputs far outside the calibration range is counted as excluded."""
        if not all(all_finite(v) for v in outputs.values()):
            if self.out_of_range(feeds):
                self.excluded += 1
            else:
                self.nonfinite += 1

    def failed(self, feeds: dict | None = None) -> None:
        self.runs += 1
        if self.out_of_range(feeds):
            self.excluded += 1
        else:
            self.errors += 1

    def summary(self) -> dict:
        ordered = sorted(self.seconds)
        runs = sorted(self.run_seconds)
        judged = self.runs - self.excluded
        return {"runs": self.runs, "samples": self.samples, "errors": self.errors, "nonfinite": self.nonfinite,
                "excluded": self.excluded, "judged_runs": judged,
                "error_rate": self.errors / judged if judged > 0 else 0.0,
                "sample_seconds_p50": ordered[len(ordered) // 2] if ordered else None,
                "run_seconds_p95": runs[min(len(runs) - 1, int(0.95 * len(runs)))] if runs else None}


class ServedVersion:
    """One loaded version of a model; closed once it is retired and nothing holds it."""

    def __init__(self, model: LoadedModel, slot: str | None, load_seconds: float, key: str):
        self.model = model
        self.health = VersionHealth()
        #: the version's DriftMonitor (agent.drift), when its bundle has reference statistics
        self.drift = None
        self.slot = slot
        self.load_seconds = load_seconds
        #: identifies what was loaded (slot + manifest hash), so the store watcher sees changes
        self.key = key
        self.holders = 0
        self.retired = False
        #: outputs that are class scores (from the bundle's drift reference) and the predicted classes
        #: counted on them (label -> runs' rows): telemetry sends the counts, the fleet's rollout gate
        #: compares them between versions
        self.class_outputs: tuple[str, ...] = ()
        self.predictions: dict[int, int] = {}
        #: each output's samples axis (the manifest's batch_axis; absent: 0)
        self.output_axes = {spec.name: spec.sample_axis for spec in getattr(model, "outputs", [])}

    @property
    def version(self) -> str:
        return self.model.version

    def count_classes(self, outputs: dict) -> None:
        """Count the predicted class of every row of each class-score output (worker thread)."""
        for name in self.class_outputs:
            value = outputs.get(name)
            # Rows are samples on the output's own samples axis (a [classes, N] output holds them on 1).
            samples_axis = self.output_axes.get(name, 0)
            if value is None or getattr(value, "ndim", 0) != 2 or samples_axis not in (0, 1):
                continue
            classes_axis = 1 - samples_axis
            if not 2 <= value.shape[classes_axis] <= 100_000 or not value.shape[samples_axis]:
                continue
            labels, counts = np.unique(value.argmax(axis=classes_axis), return_counts=True)
            for label, count in zip(labels.tolist(), counts.tolist()):
                self.predictions[label] = self.predictions.get(label, 0) + count

    def acquire(self) -> None:
        """Pin this version (a request validated against it, or a running batch)."""
        self.holders += 1

    def release(self) -> None:
        self.holders -= 1
        if self.retired and self.holders == 0:
            self.model.close()

    def retire(self) -> None:
        self.retired = True
        if self.holders == 0:
            self.model.close()


@dataclass
class Work:
    """One queued request: validated inputs, the version it is pinned to, and the future it awaits."""

    feeds: dict[str, np.ndarray]
    count: int
    served: ServedVersion
    future: asyncio.Future
    deadline: float | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    #: samples already computed (large requests run in chunks) and their outputs, allocated whole on
    #: the first chunk and filled chunk by chunk (no concatenation of thousands of parts at the end)
    done: int = 0
    outputs: dict | None = None
    #: frees the memory the feeds live in (shared memory of a large body); called exactly once, when
    #: the scheduler is done with the work: answered, failed, dropped, or cancelled and not running
    on_release: object = None

    def release(self) -> None:
        callback, self.on_release = self.on_release, None
        self.feeds = {}
        if callback is not None:
            callback()


@dataclass
class Result:
    """What a request gets back: outputs by name and the version that computed them."""

    outputs: dict[str, np.ndarray]
    served: ServedVersion
    queue_seconds: float
    inference_seconds: float

    @property
    def version(self) -> str:
        return self.served.version


class ModelScheduler:
    """Queues requests for one model name and runs them, merged into batches when the model allows."""

    def __init__(self, name: str, options: ModelConfig, metrics: ServingMetrics):
        self.name = name
        self.options = options
        self.metrics = metrics
        self.current: ServedVersion | None = None
        #: an A/B split's B version (agent.serving.split.Split) and a shadow candidate
        #: (agent.serving.shadow.ShadowRunner), when configured
        self.split = None
        self.shadow = None
        self._pending: collections.deque[Work] = collections.deque()
        self._wakeup = asyncio.Event()
        #: places of requests admitted from their head whose body is still being read and decoded
        self._places: set[Place] = set()
        #: refusals a door holds back now (hold_refusal .. refusal_released): clients that come back
        self._holding = 0
        #: seconds per sample of the recent runs of the current version (running average), under whatever
        #: else the host is doing; None until the first run
        self._live_sample_seconds: float | None = None
        self._executor = ThreadPoolExecutor(max_workers=options.instances, thread_name_prefix=f"infer-{name}")
        self._workers = [asyncio.ensure_future(self._worker()) for _ in range(options.instances)]
        self._closing = False

    # -- versions ----------------------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        """Samples one run of the current version may merge (1: no dynamic batching)."""
        if not self.current or not self.options.batching.enabled:
            return 1
        return self.current.model.merge_limit(self.options.batching.max_batch_size)

    @property
    def max_queue(self) -> int:
        """Requests that may wait: ``max_queue_size``, else what the model serves in ``queue_budget_ms``
        (or in ``deadline_ms`` when the model has a longer deadline)."""
        if self.options.max_queue_size:
            return self.options.max_queue_size
        seconds = self.sample_seconds
        if not seconds:
            return 64
        # Requests (of one sample: the common case) the model gets through in the budget, and at least
        # enough for every instance's next batch to be full when its current run ends. More than that
        # only adds waiting: under a flood every accepted request waits for the whole queue ahead of it.
        # A deadline says how long a request may wait: a closed loop of clients the model serves within
        # it is never refused (each client has one request out, so the queue never holds more).
        budget_ms = max(self.options.queue_budget_ms, self.options.deadline_ms or 0)
        budget = budget_ms / 1000 * self.options.instances / seconds
        return int(min(MAX_QUEUE, max(MIN_QUEUE, max(1, self.max_batch) * self.options.instances, budget)))

    def queue_limit(self, waiting: int) -> int:
        """Requests that may wait now, with ``waiting`` waiting: :attr:`max_queue`, or while those and the
        held refusals are more than that (an overload), the shedding queue: ``shed_queue_ms`` of work, at
        least one request per instance (the next run's), so an admitted request waits for about one run
        before its own. With a floor of two it waited for two: an unpaced flood measured 3.4-4.8x the
        unloaded p99 against 1.7-2.5x with one (benchmarks/overload.py). An explicit
        ``max_queue_size`` is kept as it is."""
        full = self.max_queue
        if (not self._holding or self.options.max_queue_size or not self.options.shed_queue_ms
                or waiting + self._holding <= full):
            return full
        seconds = self.sample_seconds
        if not seconds:
            return full
        shed = int(self.options.shed_queue_ms / 1000 * self.options.instances / seconds)
        return min(full, max(self.options.instances, shed))

    def hold_refusal(self, longest_s: float) -> float:
        """A door holds a refusal back: seconds to hold it (random, about what brings the held clients
        back at :data:`RETURN_FACTOR` times what the model serves, at most ``longest_s`` on average). It
        counts as held until :meth:`refusal_released`, exactly once."""
        self._holding += 1
        served_per_s = self.options.instances / (self.sample_seconds or 0.01)
        mean = min(longest_s, max(MIN_REFUSAL_HOLD_S, self._holding / (RETURN_FACTOR * served_per_s)))
        return mean * random.uniform(0.5, 1.5)

    def refusal_released(self) -> None:
        """A held refusal was written (or its connection went away)."""
        self._holding -= 1

    @property
    def sample_seconds(self) -> float | None:
        """Seconds per sample: of the recent runs, else as measured when the current version loaded."""
        if self._live_sample_seconds is not None:
            return self._live_sample_seconds
        return self.current.model.sample_seconds if self.current else None

    def _observe_run(self, served: ServedVersion, samples: int, seconds: float) -> None:
        # Runs of the queue's kind only: a large request's chunks run many samples at once, faster per
        # sample than the requests the queue counts.
        if served is self.current and 0 < samples <= max(1, self.max_batch):
            per = seconds / samples
            live = self._live_sample_seconds
            self._live_sample_seconds = per if live is None else live + LIVE_WEIGHT * (per - live)

    def swap(self, served: ServedVersion) -> ServedVersion | None:
        """Route new requests to ``served``; the old version closes once nothing holds it."""
        old, self.current = self.current, served
        self._live_sample_seconds = None  # the new version's speed is its own
        self.metrics.model_active(self.name, served.version, served.slot, old.version if old else None,
                                  old.slot if old else None)
        self.metrics.model_load_seconds.labels(self.name).set(served.load_seconds)
        if old is not None:
            old.retire()
        self._check_candidates()
        log.info("model active", extra={"model": self.name, "version": served.version, "slot": served.slot,
                                        "previous": old.version if old else None})
        return old

    def _check_candidates(self) -> None:
        """After a swap: a B version or shadow candidate that no longer fits the new active version
        (another version's inputs, or the same version) is dropped, with a log line; a shadow that
        fits starts comparing anew, against the new active version."""
        from .split import candidate_problem

        for kind in ("split", "shadow"):
            extra = getattr(self, kind)
            if extra is None:
                continue
            problem = candidate_problem(self.current.model, extra.served.model)
            if problem:
                setattr(self, kind, None)
                extra.close()
                log.warning(f"{kind} version dropped", extra={"model": self.name, "version": extra.version,
                                                              "active": self.current.version, "reason": problem})
            elif kind == "shadow":
                extra.reset(self.current)

    def unload(self) -> None:
        """Stop serving (no version left in the store): new requests get 404/503; queued ones finish."""
        old, self.current = self.current, None
        if old is not None:
            try:
                self.metrics.active.remove(self.name, old.version, old.slot or "")
            except KeyError:
                pass
            old.retire()
            log.warning("model unloaded", extra={"model": self.name, "version": old.version})

    # -- requests ----------------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise Overloaded when the queue (with the requests admitted but not yet queued) is full."""
        waiting = len(self._pending) + self._held()
        limit = self.queue_limit(waiting)
        if waiting >= limit and limit < self.max_queue:
            # Shedding: a place counts only for a few runs' time, so one body that trickles in (or never
            # comes) cannot hold the one place of a short queue and leave the worker idle; its request
            # still queues without a second check when it arrives within place_hold_ms.
            hold = max(self.options.shed_queue_ms / 1000, SHED_PLACE_RUNS * (self.sample_seconds or 0.01))
            waiting = len(self._pending) + self._held(time.perf_counter() - hold)
        if waiting >= limit:
            seconds = self.sample_seconds or 0.01
            wait = waiting * seconds / max(1, self.options.instances)
            full = self.max_queue
            what = f"max_queue_size {limit}" if limit == full else (
                f"shedding to {limit} of max_queue_size {full} while {self._holding} refused clients wait")
            raise Overloaded(f"model {self.name!r} is at capacity ({waiting} requests queued, {what}); retry later",
                             max(1, math.ceil(wait)), self)

    def _places_since(self) -> float:
        """Places taken after this moment still count (held for less than ``place_hold_ms``)."""
        return time.perf_counter() - self.options.place_hold_ms / 1000

    def _held(self, taken_after: float = 0.0) -> int:
        """Places that still count (and were taken after ``taken_after``, a ``perf_counter`` moment); the
        expired ones are forgotten (a place whose request never reached the dataplane, e.g. refused by
        uvicorn's connection limit, must not stay forever)."""
        if not self._places:
            return 0
        since = self._places_since()
        expired = [place for place in self._places if place.at <= since]
        for place in expired:
            self._places.discard(place)
        if taken_after <= since:
            return len(self._places)
        return sum(1 for place in self._places if place.at > taken_after)

    def reserve(self) -> Place:
        """Admit a request from its head: hold a place in the queue while its body is read and decoded
        (Overloaded when full). The place is used by :meth:`submit` or given back with
        :meth:`unreserve`, exactly once."""
        self.check_capacity()
        place = Place()
        self._places.add(place)
        return place

    def unreserve(self, place: Place) -> None:
        try:
            self._places.remove(place)
        except KeyError:
            if place.at > self._places_since():
                raise  # a place that still counts, given back twice: a bug, not a silent miscount
            # else an expired place, forgotten already (see _held)

    def pin(self, served: ServedVersion | None = None) -> ServedVersion:
        """The current version (or ``served``: an A/B split's B version), held until :meth:`unpin`;
        validate the request against it."""
        served = served or self.current
        if served is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        served.acquire()
        return served

    @staticmethod
    def unpin(served: ServedVersion) -> None:
        served.release()

    async def infer(self, feeds: dict[str, np.ndarray], served: ServedVersion, deadline: float | None = None,
                    on_release=None) -> Result:
        """Queue ``feeds`` (validated against the pinned ``served``) and wait for their outputs."""
        return await self.submit(feeds, served, deadline, on_release)

    def submit(self, feeds: dict[str, np.ndarray], served: ServedVersion, deadline: float | None = None,
               on_release=None, place: Place | None = None) -> asyncio.Future:
        """Queue ``feeds`` (validated against the pinned ``served``); the future gets a :class:`Result`.

        ``deadline``: a ``time.perf_counter()`` moment after which the work is dropped (DeadlineExceeded).
        Cancelling the future drops the queued work. ``on_release`` (the scheduler owns it from here on)
        is called once nothing reads the feeds any more, never while a run still uses them.
        ``place``: from :meth:`reserve`, used here whatever happens; a place that still counts admits the
        request without a second check, an expired one (a slow upload) is checked again."""
        if place is not None:
            self.unreserve(place)
        if place is None or place.at <= self._places_since():
            try:
                self.check_capacity()
            except Overloaded:
                if on_release is not None:
                    on_release()
                raise
        # Samples along each input's own axis; a model without a batch axis: one per request.
        count = served.model.backend.count(feeds) if served.model.backend.batched else 1
        work = Work(feeds, count, served, asyncio.get_running_loop().create_future(), deadline,
                    on_release=on_release)
        del feeds  # the work holds them, until it is released
        self._pending.append(work)
        self.metrics.queue_depth.labels(self.name).inc()
        self._wakeup.set()
        return work.future

    def _drop_dead(self) -> None:
        """Remove cancelled work and work whose deadline passed from the queue head and anywhere in it."""
        now = time.perf_counter()
        if not any(w.future.done() or (w.deadline is not None and now >= w.deadline) for w in self._pending):
            return  # the common case: nothing to drop, no new queue built
        alive = collections.deque()
        for work in self._pending:
            if work.future.done():
                self.metrics.queue_depth.labels(self.name).dec()
                work.release()
                continue
            if work.deadline is not None and now >= work.deadline:
                self.metrics.queue_depth.labels(self.name).dec()
                work.future.set_exception(DeadlineExceeded(
                    f"the request waited {now - work.queued_at:.3f} s, past its deadline; retry or allow more time"))
                work.release()
                continue
            alive.append(work)
        self._pending = alive

    def _take_batch(self) -> list[Work]:
        """The oldest work and, in order, the queued work pinned to the same version that fits with it."""
        first = self._pending.popleft()
        batch, total = [first], first.count
        limit = first.served.model.merge_limit(self.options.batching.max_batch_size) if self.options.batching.enabled else 1
        if limit > 1 and total < limit and first.done == 0 and first.served.model.mergeable:
            kept = collections.deque()
            while self._pending:
                work = self._pending.popleft()
                if (work.served is first.served and total + work.count <= limit and not work.done
                        and not work.future.done()):
                    batch.append(work)
                    total += work.count
                else:
                    kept.append(work)
                if total >= limit:
                    break
            kept.extend(self._pending)
            self._pending = kept
        return batch

    async def _wait_for_work(self) -> bool:
        while True:
            self._drop_dead()
            if self._pending:
                return True
            if self._closing:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while await self._wait_for_work():
            delay = self.options.batching.max_queue_delay_ms / 1000
            if delay and self.max_batch > 1:
                # Triton's rule: the oldest request may wait up to the delay for the batch to fill.
                until = self._pending[0].queued_at + delay
                while sum(w.count for w in self._pending) < self.max_batch and time.perf_counter() < until:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), until - time.perf_counter())
                    except asyncio.TimeoutError:
                        break
                self._drop_dead()
                if not self._pending:
                    continue
            elif self.max_batch > 1 and self._places:
                await self._gather_held()
                self._drop_dead()
                if not self._pending:
                    continue
            batch = self._take_batch()
            self.metrics.queue_depth.labels(self.name).dec(len(batch))
            if (len(batch) == 1 and batch[0].count > max(self._chunk(batch[0]), self.max_batch)
                    and batch[0].served.model.mergeable):
                await self._run_chunk(batch[0])
                continue
            served = batch[0].served
            served.acquire()
            started = time.perf_counter()
            try:
                elapsed = await loop.run_in_executor(self._executor, self._run, served, batch,
                                                     self.options.batching.max_batch_size, loop, started)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                served.health.failed(batch[0].feeds if len(batch) == 1 else None)
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(exc)
                continue
            finally:
                served.release()
                for work in batch:  # the run is over: nothing reads the feeds any more
                    work.release()
            self.metrics.observe_batch(self.name, sum(w.count for w in batch), elapsed, served.version)
            served.health.observe(sum(w.count for w in batch), elapsed)
            self._observe_run(served, sum(w.count for w in batch), elapsed)

    async def _gather_held(self) -> None:
        """Wait a little for requests already admitted from their head (body on the way) to join the
        batch: a closed loop of clients sends its next requests together when a batch's answers go
        out, and the one decoded first would otherwise run alone while the others queue behind it.
        At most ``GATHER_SAMPLES`` samples' run time: waiting longer would cost more than a run of its
        own. Only known arrivals are waited for, so a lone client (no place held) never waits."""
        seconds = self.sample_seconds
        if not seconds:
            return
        until = time.perf_counter() + min(GATHER_SAMPLES * seconds, GATHER_MAX_S)
        while (self._held() and self._pending and sum(w.count for w in self._pending) < self.max_batch
               and time.perf_counter() < until):
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), until - time.perf_counter())
            except asyncio.TimeoutError:
                break

    @staticmethod
    def _deliver(served: ServedVersion, batch: list[Work], outputs: dict, started: float, elapsed: float) -> None:
        """Hand a run's outputs to its requests (event loop)."""
        offset = 0
        for work in batch:
            part = outputs if len(batch) == 1 else {k: v[offset:offset + work.count] for k, v in outputs.items()}
            offset += work.count
            if not work.future.done():  # the client may have gone away
                work.future.set_result(Result(part, served, started - work.queued_at, elapsed))

    def _chunk(self, work: Work) -> int:
        """Samples of a large request that run at a time: about CHUNK_SECONDS of work at the latency
        measured at load, a whole number of a fixed batch."""
        seconds = work.served.model.sample_seconds
        samples = CHUNK_SAMPLES if not seconds else int(min(CHUNK_SAMPLES, max(1, CHUNK_SECONDS / seconds)))
        fixed = work.served.model.batch_size or 1
        return max(1, -(-samples // fixed)) * fixed

    async def _run_chunk(self, work: Work) -> None:
        """Run a large request chunk by chunk until it is done or other work is waiting; then the rest
        queues behind that work. The chunks run back to back on the worker thread, so the event loop
        stays free for the small requests arriving meanwhile."""
        served, started = work.served, time.perf_counter()
        chunk = self._chunk(work)

        def run_chunks() -> int:
            ran = 0
            while work.done < work.count:
                rows = slice(work.done, min(work.count, work.done + chunk))
                # One runtime call per chunk where the model allows it: no other request shares it.
                feeds = {name: array[rows] for name, array in work.feeds.items()}
                began = time.perf_counter()
                part = served.model.run(feeds, chunk)
                ran_for = time.perf_counter() - began
                served.health.check_outputs(part, feeds)
                if served.class_outputs:
                    served.count_classes(part)
                if served.drift is not None:
                    served.drift.safe_observe(*served.model.leading(feeds, part), ran_for)
                if work.outputs is None:
                    work.outputs = {name: np.empty((work.count, *value.shape[1:]), value.dtype)
                                    for name, value in part.items()}
                for name, value in part.items():
                    work.outputs[name][rows] = value
                work.done, ran = rows.stop, ran + rows.stop - rows.start
                # Someone is waiting, or the client went away (reads of a deque's length and of a
                # future's state: safe across threads; at worst one more chunk runs).
                if self._pending or work.future.done():
                    break
            return ran

        served.acquire()
        try:
            ran = await asyncio.get_running_loop().run_in_executor(self._executor, run_chunks)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request
            served.health.failed(work.feeds)
            if not work.future.done():
                work.future.set_exception(exc)
            work.release()
            return
        finally:
            served.release()
        elapsed = time.perf_counter() - started
        self.metrics.observe_batch(self.name, ran, elapsed, served.version)
        served.health.observe(ran, elapsed)
        self._observe_run(served, ran, elapsed)
        if work.future.done():
            work.release()  # cancelled or past its deadline meanwhile; the run is over
            return
        if work.done < work.count:
            self._pending.append(work)
            self.metrics.queue_depth.labels(self.name).inc()
            return
        outputs, work.outputs = work.outputs, None
        work.release()
        work.future.set_result(Result(outputs, served, started - work.queued_at, elapsed))

    @classmethod
    def _run(cls, served: ServedVersion, batch: list[Work], max_batch: int, loop, started: float) -> float:
        """Run a batch on the worker thread; its requests get their outputs as soon as the run is over,
        and the monitoring (non-finite outputs, class counts, drift) follows on this thread while they
        are encoded and sent: it reads what the answers read and adds nothing to their latency. The
        feeds stay alive until this returns. Returns the run's seconds since ``started``."""
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {name: np.concatenate([w.feeds[name] for w in batch]) for name in batch[0].feeds}
        # A request larger than the batch limit is split by the model's one splitter.
        began = time.perf_counter()
        outputs = served.model.run(feeds, max_batch)
        ran_for = time.perf_counter() - began
        elapsed = time.perf_counter() - started
        loop.call_soon_threadsafe(cls._deliver, served, batch, outputs, started, elapsed)
        try:
            served.health.check_outputs(outputs, feeds)
            if served.class_outputs:
                served.count_classes(outputs)
            if served.drift is not None:
                served.drift.safe_observe(*served.model.leading(feeds, outputs), ran_for)
        except Exception:  # noqa: BLE001 - the answers are out; a monitoring bug must not count as a failed run
            log.exception("monitoring a run failed")
        return elapsed

    async def close(self) -> None:
        """Finish queued work, stop the workers and close the active version (and a shadow or B one)."""
        self._closing = True
        self._wakeup.set()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._executor.shutdown(wait=True)
        for extra in (self.shadow, self.split):
            if extra is not None:
                extra.close()
        if self.current is not None:
            self.current.retire()
