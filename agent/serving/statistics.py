"""Triton's statistics extension: per model version, what ``tritonclient``'s
``get_inference_statistics()`` reads (``GET /v2/models[/{name}[/versions/{v}]]/stats``).

Semantics as Triton's ``ModelStatistics`` (``grpc_service.proto``): ``success``/``fail`` count requests
and their whole handling time; ``queue`` the time successful requests waited for a batch;
``compute_input`` decoding and checking the inputs, ``compute_infer`` the runtime's share of the batch
each request ran in, ``compute_output`` encoding the answer; ``inference_count`` samples computed,
``execution_count`` runtime executions (batches), each also counted in ``batch_stats`` by its size.
Durations are cumulative nanoseconds. Updated on the event loop (requests) and by the scheduler
(batches); reads take a consistent copy under one lock.
"""

from __future__ import annotations

import threading
import time

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


class _Version:
    __slots__ = ("durations", "inference_count", "execution_count", "last_inference", "batches")

    def __init__(self) -> None:
        self.durations = {key: [0, 0] for key in DURATIONS}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference = 0
        self.batches: dict[int, list[int]] = {}  # batch size -> [count, infer ns]


class InferenceStatistics:
    """Counters per (model, version)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, str], _Version] = {}

    def _of(self, model: str, version: str) -> _Version:
        key = (model, version)
        found = self._versions.get(key)
        if found is None:
            found = self._versions[key] = _Version()
        return found

    def request(self, model: str, version: str, ok: bool, total_s: float, queue_s: float = 0.0,
                input_s: float = 0.0, infer_s: float = 0.0, output_s: float = 0.0) -> None:
        """One request ended (``ok``: answered; else failed after it reached a model version)."""
        with self._lock:
            entry = self._of(model, version)
            spans = {"success" if ok else "fail": total_s}
            if ok:
                spans.update(queue=queue_s, compute_input=input_s, compute_infer=infer_s, compute_output=output_s)
            for key, seconds in spans.items():
                entry.durations[key][0] += 1
                entry.durations[key][1] += int(seconds * 1e9)
            entry.last_inference = int(time.time() * 1000)

    def batch(self, model: str, version: str, size: int, seconds: float) -> None:
        """The runtime executed ``size`` samples in ``seconds``."""
        with self._lock:
            entry = self._of(model, version)
            entry.inference_count += size
            entry.execution_count += 1
            counts = entry.batches.setdefault(size, [0, 0])
            counts[0] += 1
            counts[1] += int(seconds * 1e9)

    def forget(self, model: str, keep: set[str]) -> None:
        """Drop the versions of ``model`` not in ``keep`` (unloaded)."""
        with self._lock:
            for key in [k for k in self._versions if k[0] == model and k[1] not in keep]:
                del self._versions[key]

    def report(self, versions: list[tuple[str, str]]) -> dict:
        """Triton's JSON for ``versions`` ((model, version) pairs, those never used included)."""
        stats = []
        with self._lock:
            for model, version in versions:
                entry = self._versions.get((model, version)) or _Version()
                stats.append({
                    "name": model, "version": version, "last_inference": entry.last_inference,
                    "inference_count": entry.inference_count, "execution_count": entry.execution_count,
                    "inference_stats": {key: {"count": count, "ns": ns} for key, (count, ns) in entry.durations.items()},
                    "batch_stats": [{"batch_size": size, "compute_input": {"count": count, "ns": 0},
                                     "compute_infer": {"count": count, "ns": ns}, "compute_output": {"count": count, "ns": 0}}
                                    for size, (count, ns) in sorted(entry.batches.items())],
                    "memory_usage": [],
                })
        return {"model_stats": stats}
