"""Benchmark: TFLite fp32 vs full-integer int8 vs the ONNX recipes for a MobileNet-style CNN.

    python benchmarks/tflite.py [--epochs 3] [--size 96] [--runs 5] [--profile rpi4]

Builds and briefly trains the MobileNetV2-style network of benchmarks/mobilenet.py, runs
`edgepack convert --profile rpi4 --try-all` with every TFLite and ONNX recipe, then re-times each
candidate on this host (LiteRT with XNNPACK, ONNX Runtime CPU; batch 1, the profile's threads capped
at this host's cores, median of --runs interleaved 1-s runs) and prints size, p50 and top-1 agreement
with the original PyTorch model. Host timings say nothing definite about a Raspberry Pi, so the real
rpi4 profile does not enforce host latency; this benchmark runs a copy of it with
``max_latency_vs_fp32`` set to --host-latency-budget (default 1.0), so the table shows the gate
refusing an int8 model that is slower than fp32 on this host as well as one that is less accurate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RECIPES = ["tflite-int8", "tflite-int8-mixed", "tflite-int8-dynamic", "tflite-fp16", "tflite-fp32", "onnx-int8-static",
           "onnx-int8-mixed", "onnx-fp32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", default="rpi4")
    parser.add_argument("--host-latency-budget", type=float, default=1.0,
                        help="max p50 vs onnx-fp32 on this host for quantized candidates (0 = the profile's own rule)")
    args = parser.parse_args()

    from convert import time_models
    from converters.pipeline import ConvertOptions, convert
    from edgepack.profiles import get_profile
    from mobilenet import export_trained

    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        if args.host_latency_budget:
            _enforce_host_latency(temp / "profiles", args.profile, args.host_latency_budget)
        images, labels = export_trained(temp, args.size, args.epochs)
        start = time.time()
        (result,) = convert(ConvertOptions(
            model=str(temp / "mobilenet.pt2"), profiles=[args.profile], out=temp / "out", calibration=str(temp / "calibration.npz"),
            validation=str(temp / "validation.npz"), try_all=True, workdir=temp / "work", recipes=RECIPES,
        ))
        print(f"edgepack convert --profile {args.profile} --try-all: {time.time() - start:.0f} s; shipped {result.chosen}")
        profile = get_profile(args.profile)
        threads = max(1, min(profile.threads, os.cpu_count() or 1))
        timed = time_models({row.recipe: row.model_path for row in result.candidates if row.model_path},
                            {"input": images[:1]}, threads, args.runs)
        sizes = {row.recipe: row.size_bytes for row in result.candidates if row.size_bytes}
        print(f"\nhost: {os.cpu_count()} cores, {threads} threads, batch 1; latency = median of {args.runs} interleaved runs\n")
        print("| recipe | status | size | vs tflite-fp32 | vs onnx-fp32 | p50 ms | speed vs tflite-fp32 | speed vs onnx-fp32 | top-1 agreement | accuracy | why |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        base_t, base_o = timed.get("tflite-fp32"), timed.get("onnx-fp32")
        for row in result.candidates:
            latency = timed.get(row.recipe)
            size = sizes.get(row.recipe)

            def ratio(a, b, fmt="{:.2f}x"):
                return fmt.format(a / b) if a and b else "-"

            metrics = row.metrics or {}
            agreement = f"{metrics['agreement']:.2%}" if "agreement" in metrics else "-"
            accuracy = f"{metrics['accuracy']:.2%}" if metrics.get("accuracy") is not None else "-"
            print(f"| {row.recipe} | {row.status} | {f'{size / 1024:.0f} KiB' if size else '-'} | "
                  f"{ratio(size, sizes.get('tflite-fp32'))} | {ratio(size, sizes.get('onnx-fp32'))} | "
                  f"{f'{latency:.2f}' if latency else '-'} | {ratio(base_t, latency)} | {ratio(base_o, latency)} | "
                  f"{agreement} | {accuracy} | {'; '.join(row.reasons)} |")
        fp32 = next((row.model_path for row in result.candidates if row.recipe == "tflite-fp32" and row.model_path), None)
        if fp32:
            instance_scaling(fp32, images[:1])


def instance_scaling(path: Path, sample, seconds: float = 3.0) -> None:
    """Throughput of the agent's LiteRT backend with 1 vs 2 interpreters (1 thread each), 2 callers."""
    import threading

    from agent.runtime.litert_backend import LiteRTBackend

    print("\nLiteRT backend, tflite-fp32, 1 thread per interpreter, 2 concurrent callers, batch 1:\n")
    print("| interpreters (instances) | runs/s | vs 1 |")
    print("|---|---|---|")
    base = None
    for instances in (1, 2):
        backend = LiteRTBackend(path, threads=1, instances=instances)
        feeds = {backend.inputs[0].name: sample}
        backend.run(feeds)
        counts = [0, 0]
        deadline = time.perf_counter() + seconds

        def caller(slot: int) -> None:
            while time.perf_counter() < deadline:
                backend.run(feeds)
                counts[slot] += 1

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        backend.close()
        rate = sum(counts) / seconds
        base = base or rate
        print(f"| {instances} | {rate:.0f} | {rate / base:.2f}x |")


def _enforce_host_latency(folder: Path, name: str, budget: float) -> None:
    """A copy of the profiles where ``name`` refuses quantized candidates slower than ``budget`` x fp32 here."""
    import shutil

    import yaml

    from edgepack.profiles import profiles_dir

    shutil.copytree(profiles_dir(), folder)
    data = yaml.safe_load((folder / f"{name}.yaml").read_text())
    data.setdefault("budgets", {})["max_latency_vs_fp32"] = budget
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    os.environ["EDGEPACK_PROFILES_DIR"] = str(folder)
    print(f"profile {name} with budgets.max_latency_vs_fp32 = {budget} (host latency enforced for this benchmark)")


if __name__ == "__main__":
    main()
