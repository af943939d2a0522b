"""Per-model request scheduling: a queue, dynamic batching, and versions that retire only when idle.

All bookkeeping runs on the event loop thread; only ``backend.run`` runs on the model's worker
threads (ONNX Runtime and LiteRT release the GIL while they compute). A request is validated before
it is queued, so a batch only ever holds requests that fit the model.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from ..model import LoadedModel
from .metrics import ServingMetrics

log = logging.getLogger("edgepack.agent.serving")


class ServedVersion:
    """One loaded version of a model; closed once it is retired and no batch uses it."""

    def __init__(self, model: LoadedModel, slot: str | None, load_seconds: float, key: str):
        self.model = model
        self.slot = slot
        self.load_seconds = load_seconds
        #: identifies what was loaded (slot + manifest hash), so the store watcher sees changes
        self.key = key
        self.in_flight = 0
        self.retired = False

    @property
    def version(self) -> str:
        return self.model.version

    def acquire(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self.model.close()

    def retire(self) -> None:
        self.retired = True
        if self.in_flight == 0:
            self.model.close()


@dataclass
class Work:
    """One queued request: validated inputs, how many samples, and the future its handler awaits."""

    feeds: dict[str, np.ndarray]
    count: int
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Result:
    """What a request gets back: outputs by name and the version that computed them."""

    outputs: dict[str, np.ndarray]
    version: str
    queue_seconds: float
    inference_seconds: float


class ModelScheduler:
    """Queues requests for one model name and runs them, merged into batches when the model allows."""

    def __init__(self, name: str, options: ModelConfig, metrics: ServingMetrics):
        self.name = name
        self.options = options
        self.metrics = metrics
        self.current: ServedVersion | None = None
        self._pending: collections.deque[Work] = collections.deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=options.instances, thread_name_prefix=f"infer-{name}")
        self._workers = [asyncio.ensure_future(self._worker()) for _ in range(options.instances)]
        self._closing = False

    # -- versions ----------------------------------------------------------------------------------

    def batching_applies(self, model: LoadedModel) -> bool:
        """Batching needs a free batch dimension on every input and output."""
        return all(spec.batch_dynamic for spec in model.inputs) and all(spec.batch_dynamic for spec in model.outputs)

    @property
    def max_batch(self) -> int:
        batching = self.options.batching
        if self.current and batching.enabled and self.batching_applies(self.current.model):
            return batching.max_batch_size
        return 1

    def swap(self, served: ServedVersion) -> ServedVersion | None:
        """Route new batches to ``served``; the old version closes after its in-flight batches."""
        old, self.current = self.current, served
        self.metrics.model_active(self.name, served.version, served.slot, old.version if old else None,
                                  old.slot if old else None)
        self.metrics.model_load_seconds.labels(self.name).set(served.load_seconds)
        if old is not None:
            old.retire()
        log.info("model active", extra={"model": self.name, "version": served.version, "slot": served.slot,
                                        "previous": old.version if old else None})
        return old

    # -- requests ----------------------------------------------------------------------------------

    async def infer(self, feeds: dict[str, np.ndarray]) -> Result:
        """Queue validated ``feeds`` (N samples) and wait for their outputs."""
        first = next(iter(feeds.values()))
        count = first.shape[0] if first.ndim else 1
        work = Work(feeds, count, asyncio.get_running_loop().create_future())
        self._pending.append(work)
        self.metrics.queue_depth.labels(self.name).inc()
        self._wakeup.set()
        return await work.future

    def _take_batch(self) -> list[Work]:
        limit = self.max_batch
        batch = [self._pending.popleft()]
        total = batch[0].count
        while self._pending and limit > 1 and total + self._pending[0].count <= limit:
            work = self._pending.popleft()
            batch.append(work)
            total += work.count
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            delay = self.options.batching.max_queue_delay_ms / 1000
            if delay and self.max_batch > 1:
                # Triton's rule: the oldest request may wait up to the delay for the batch to fill.
                deadline = self._pending[0].queued_at + delay
                while sum(w.count for w in self._pending) < self.max_batch and time.perf_counter() < deadline:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), deadline - time.perf_counter())
                    except asyncio.TimeoutError:
                        break
                if not self._pending:
                    continue
            batch = self._take_batch()
            self.metrics.queue_depth.labels(self.name).dec(len(batch))
            served = self.current
            if served is None:  # cannot happen once loaded; handlers check readiness first
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(RuntimeError(f"model {self.name!r} is not loaded"))
                continue
            served.acquire()
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, served.model, batch)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(exc)
                continue
            finally:
                served.release()
            elapsed = time.perf_counter() - started
            self.metrics.observe_batch(self.name, sum(w.count for w in batch), elapsed)
            offset = 0
            for work in batch:
                part = outputs if len(batch) == 1 else {k: v[offset:offset + work.count] for k, v in outputs.items()}
                offset += work.count
                if not work.future.done():  # the client may have gone away
                    work.future.set_result(Result(part, served.version, started - work.queued_at, elapsed))

    @staticmethod
    def _run(model: LoadedModel, batch: list[Work]) -> dict[str, np.ndarray]:
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {name: np.concatenate([w.feeds[name] for w in batch]) for name in batch[0].feeds}
        results = model.backend.run(feeds)
        return {spec.name: value for spec, value in zip(model.outputs, results)}

    async def close(self) -> None:
        """Finish queued work, stop the workers and close the active version."""
        self._closing = True
        self._wakeup.set()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._executor.shutdown(wait=True)
        if self.current is not None:
            self.current.retire()
