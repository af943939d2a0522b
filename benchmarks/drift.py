"""Cost of on-device drift scoring per request against the model's own latency.

    python benchmarks/drift.py

For each model: the median time of one ``model.run`` on one sample (the agent's runtime call) and of
``DriftMonitor.observe`` on the same sample and outputs (what the scheduler adds per run), and their
ratio. Models: the fleet tests' MLP (8 features), the digits CNN (1x8x8), and a MobileNet-sized
input (3x224x224) against the digits CNN's reference layout scaled up (observe's cost depends on the
input size, not the model).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from overload import cpu_flags  # noqa: E402


def median_us(fn, repeats: int = 2000) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    import digits_cnn

    from agent.drift import DriftMonitor, monitor_for
    from agent.loader import load_bundle
    from converters.pipeline import ConvertOptions, convert
    from converters.stats import dataset_stats

    work = Path(tempfile.mkdtemp(prefix="edgepack-drift-bench-"))
    digits_cnn.main(work)
    np.save(work / "calib.npy", np.random.default_rng(0).uniform(0.1, 1.0, (64, 8)).astype(np.float32))
    jobs = [("fleet MLP (1x8)", dict(model="tests.models:fleet_good", calibration=str(work / "calib.npy"),
                                    input_shapes={"input": [1, 8]}, name="fleet")),
            ("digits CNN (1x1x8x8)", dict(model=str(work / "digits_cnn.pt2"), calibration=str(work / "calibration.npz"),
                                          name="digits"))]
    rows = []
    for label, options in jobs:
        (result,) = convert(ConvertOptions(profiles=["x86-64"], out=work / label.split()[0], recipes=["onnx-fp32"], **options))
        model = load_bundle(result.bundle, work / f"x-{label.split()[0]}", threads=1)
        monitor = monitor_for(model)
        spec = model.inputs[0]
        sample = {spec.name: np.random.default_rng(1).uniform(0.1, 1.0, [1, *spec.shape[1:]]).astype(np.float32)}
        outputs = model.run(sample, 1)
        run_us = median_us(lambda: model.run(sample, 1))
        drift_us = median_us(lambda: monitor.observe(sample, outputs))
        rows.append((label, run_us, drift_us))
        model.close()
    # A MobileNet-sized input: observe() alone (its cost follows the input size, not the model).
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 1, (16, 3, 224, 224)).astype(np.float32)
    reference = dataset_stats({"image": images}, "bench", {"scores": rng.normal(size=(16, 1000)).astype(np.float32)})
    monitor = DriftMonitor(reference, ["image"], ["scores"])
    sample, outputs = {"image": images[:1]}, {"scores": rng.normal(size=(1, 1000)).astype(np.float32)}
    rows.append(("3x224x224 input, 1000 classes (observe only)", None, median_us(lambda: monitor.observe(sample, outputs), 500)))
    print(f"CPU: {cpu_flags()}")
    print("| model (1 sample per request) | model.run p50 (µs) | drift observe p50 (µs) | drift / model |")
    print("|---|---|---|---|")
    for label, run_us, drift_us in rows:
        ratio = f"{drift_us / run_us:.2f}x" if run_us else "n/a"
        print(f"| {label} | {run_us:.1f} | {drift_us:.1f} | {ratio} |" if run_us else f"| {label} | — | {drift_us:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
