"""Benchmark a bundle on this machine: latency percentiles, throughput, load time and memory."""

from __future__ import annotations

import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from edgepack.bundle import open_bundle

from .loader import load_bundle


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _percentiles(times_ms: list[float]) -> dict:
    values = np.asarray(times_ms)
    return {"p50_ms": float(np.percentile(values, 50)), "p95_ms": float(np.percentile(values, 95)),
            "p99_ms": float(np.percentile(values, 99)), "runs": len(times_ms)}


def bench_bundle(path: Path, seconds: float = 3.0, threads: int | None = None, batches=(1, 8)) -> dict:
    """Measure the bundle's model with its sample inputs at each batch size."""
    with tempfile.TemporaryDirectory() as temp:
        before = _rss_mb()
        start = time.perf_counter()
        model = load_bundle(path, Path(temp), threads=threads)
        load_ms = (time.perf_counter() - start) * 1000
        model_rss = _rss_mb() - before
        manifest = model.manifest
        with open_bundle(path, verify_files=False) as bundle:
            sample = {name: bundle.read_array(file)[:1] for name, file in manifest["samples"]["inputs"].items()}
        rows = []
        # A fixed-batch model runs in chunks of its batch (padded), as the agent serves it.
        for batch in batches if model.merge_limit(max(batches)) > 1 else (1,):
            feeds = {name: np.repeat(array, batch, axis=0) for name, array in sample.items()}
            for _ in range(5):
                model.run(feeds, batch)
            times = []
            deadline = time.perf_counter() + seconds / len(batches)
            while time.perf_counter() < deadline or len(times) < 10:
                begin = time.perf_counter()
                model.run(feeds, batch)
                times.append((time.perf_counter() - begin) * 1000)
            row = {"batch": batch, **_percentiles(times)}
            row["samples_per_s"] = batch * 1000 / float(np.mean(times))
            rows.append(row)
        model.close()
        return {
            "name": manifest["name"], "version": manifest["version"], "profile": manifest["profile"],
            "precision": manifest["precision"], "machine": platform.machine(),
            "threads": threads or manifest["runtime"].get("threads"), "load_ms": load_ms,
            "model_rss_mb": model_rss, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "batches": rows,
        }
