"""Benchmark: every ONNX recipe against fp32 for a MobileNet-style CNN, and what `convert` picks.

    python benchmarks/convert.py [--epochs 2] [--size 96] [--runs 5]

Builds and briefly trains a MobileNetV2-style network (depthwise convolutions, ReLU6, squeeze-excite),
runs `edgepack convert --profile x86-64 --try-all`, then re-times every candidate model on this host
(median of --runs runs of ~1 s each, batch 1, the profile's threads) and prints size ratio, latency
ratio vs fp32 and top-1 agreement with the original PyTorch model.
Target (issue 2): the recipe picked for x86-64 is >= 1.3x faster than fp32 with >= 99% agreement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def time_models(paths: dict[str, Path], sample: dict, threads: int, runs: int) -> dict[str, float]:
    """Median latency per model; runs are interleaved so machine drift hits every model alike. ONNX
    sessions do not spin, as the agent runs them (an idle session's spinning threads would slow the
    others' runs)."""
    from agent.runtime.litert_backend import LiteRTBackend
    from agent.runtime.onnx_backend import OnnxBackend

    def load(path):
        return LiteRTBackend(path, threads=threads, input_names=list(sample)) if Path(path).suffix == ".tflite" \
            else OnnxBackend(path, threads=threads, spinning=False)

    backends = {name: load(path) for name, path in paths.items()}
    for backend in backends.values():
        for _ in range(10):
            backend.run(sample)
    medians: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):
        for name, backend in backends.items():
            times = []
            deadline = time.perf_counter() + 1.0
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                backend.run(sample)
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times) * 1000)
    return {name: statistics.median(values) for name, values in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", default="x86-64")
    args = parser.parse_args()

    from converters.pipeline import ConvertOptions, convert
    from edgepack.profiles import get_profile
    from mobilenet import export_trained

    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        images, labels = export_trained(temp, args.size, args.epochs)
        profile = get_profile(args.profile)
        recipes = [r.name for r in profile.recipes if r.name.startswith("onnx")]
        for extra in ("onnx-fp16", "onnx-int8-dynamic"):
            if extra not in recipes:
                recipes.append(extra)
        start = time.time()
        results = convert(ConvertOptions(
            model=str(temp / "mobilenet.pt2"), profiles=[args.profile], out=temp / "out", calibration=str(temp / "calibration.npz"),
            validation=str(temp / "validation.npz"), try_all=True, workdir=temp / "work", recipes=recipes,
        ))
        result = results[0]
        print(f"edgepack convert --profile {args.profile} --try-all: {time.time() - start:.0f} s; shipped {result.chosen}")
        threads = max(1, min(profile.threads, os.cpu_count() or 1))
        sample = {"input": images[:1]}
        rows = []
        timed = time_models({row.recipe: row.model_path for row in result.candidates if row.model_path}, sample, threads, args.runs)
        fp32_ms = timed.get("onnx-fp32")
        for row in result.candidates:
            if row.model_path is None:
                rows.append((row.recipe, row.status, None, None, None, None, "; ".join(row.reasons)))
                continue
            latency = timed[row.recipe]
            rows.append((row.recipe, row.status, row.size_ratio, latency, row.metrics.get("agreement"),
                         row.metrics.get("accuracy"), "; ".join(row.reasons)))
        fp32_ms = fp32_ms or next(r[3] for r in rows if r[3])
        print(f"\nhost: {os.cpu_count()} cores, {threads} threads, batch 1; latency = median of {args.runs} runs\n")
        print("| recipe | status | size vs fp32 | p50 ms | speed-up vs fp32 | top-1 agreement | accuracy | why |")
        print("|---|---|---|---|---|---|---|---|")
        for recipe, status, size, latency, agree, acc, why in rows:
            fmt = lambda v, p: "-" if v is None else p.format(v)
            print(f"| {recipe} | {status} | {fmt(size, '{:.2f}x')} | {fmt(latency, '{:.2f}')} | "
                  f"{fmt(fp32_ms / latency if latency else None, '{:.2f}x')} | {fmt(agree, '{:.2%}')} | {fmt(acc, '{:.2%}')} | {why} |")
        chosen = next(r for r in rows if r[1] == "shipped")
        speedup = fp32_ms / chosen[3]
        verdict = "MET" if speedup >= 1.3 and (chosen[4] or 0) >= 0.99 else "MISSED"
        print(f"\ntarget: picked recipe {chosen[0]} is {speedup:.2f}x fp32 with {chosen[4]:.2%} agreement "
              f"(>= 1.3x and >= 99%): {verdict}")


if __name__ == "__main__":
    main()
