"""Benchmark: PP-OCRv4's text detector through `edgepack convert` on x86-64 (every recipe of the profile).

    python benchmarks/detector.py [--calibration 64] [--validation 16] [--size 640] [--profile x86-64] [--isa avx2]

The model is the ONNX file the rapidocr-onnxruntime wheel ships (`pip install --no-deps
rapidocr-onnxruntime`); the images are crops of scikit-image's photos of text (tests/photos.py), the
validation crops distinct from the calibration ones. Prints, in one run on this host:

- each recipe's row from the conversion report: status, size, p50 and ratio to fp32 (the gate's own
  interleaved timing), map cosine and IoU (pixels > 0.3), float layers kept by the mixed recipe;
- the conversion's wall time and peak RSS (getrusage of the converting process);
- the exported graph as shipped vs the base graph the converter built from it (pre-processed and
  simplified: Conv+BN and the conv scale/offset folded, hard-swish fused), both fp32, and the shipped
  model vs that base graph: interleaved, threads not spinning, as the agent runs them (spinning
  threads of one session slow down the other one's runs: the ratio would be of that interference).

``--isa avx2`` runs it all with AVX-512, VNNI and AMX hidden from CPUID (benchmarks/isa.py), so a
VNNI host times the kernels a plain AVX2 device gets.

Issue 18's targets: int8 on x86-64 >= 1.3x fp32 speed with map IoU >= 0.9 and cosine >= 0.99;
64 calibration images at 640x640 in <= 5 minutes and <= 4 GB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from convert_memory import MEASURED, detector  # noqa: E402
from isa import kernels, rerun_masked  # noqa: E402
from overload import cpu_flags  # noqa: E402
from tests.photos import text_images  # noqa: E402


def interleaved_p50(paths: list[Path], image: np.ndarray, rounds: int = 15) -> list[float]:
    import onnxruntime as ort

    sessions = []
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = 2, 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        sessions[-1].run(None, {"x": image})
    times = [[] for _ in sessions]
    for _ in range(rounds):
        for session, spent in zip(sessions, times):
            started = time.perf_counter()
            session.run(None, {"x": image})
            spent.append(time.perf_counter() - started)
    return [float(np.median(spent)) * 1000 for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--validation", type=int, default=16)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--profile", default="x86-64")
    parser.add_argument("--isa", choices=["avx2"], help="hide AVX-512/VNNI/AMX from ONNX Runtime (benchmarks/isa.py)")
    args = parser.parse_args()
    rerun_masked(args.isa)
    model = detector()
    if model is None:
        sys.exit("pip install --no-deps rapidocr-onnxruntime first (it ships the detector's ONNX file)")
    with tempfile.TemporaryDirectory(prefix="edgepack-detector-") as temp:
        folder = Path(temp)
        np.save(folder / "calibration.npy", text_images(args.calibration, args.size, seed=0))
        validation = text_images(args.validation, args.size, seed=1)
        np.save(folder / "validation.npy", validation)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", MEASURED, "convert", str(model), "--name", "det", "--profile", args.profile,
                               "--calibration", str(folder / "calibration.npy"), "--validation", str(folder / "validation.npy"),
                               "--try-all", "--out", str(folder / "out"), "--json"], capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(done.stderr[-2000:])
        found = re.search(r"maxrss (\d+) (\d+)", done.stderr)
        peak = max(map(int, found.groups())) / 1024 if found else float("nan")
        (report,) = json.loads(done.stdout)["profiles"]
        print(f"PP-OCRv4 det ({model.name}), {args.size}x{args.size}, profile {args.profile}: {args.calibration} calibration "
              f"and {args.validation} validation crops of scikit-image photos of text")
        print(f"CPU: {cpu_flags()}; {kernels()}")
        print(f"\n{'recipe':<18} {'status':<9} {'size KiB':>9} {'p50 ms':>8} {'vs fp32':>8} {'speedup':>8} {'map IoU':>8} "
              f"{'cosine':>8} {'float':>6}  why")
        for row in report["candidates"]:
            outputs = (row.get("metrics") or {}).get("outputs") or [{}]
            floats = len(row.get("details", {}).get("float_layers", [])) or ""
            ratio = row.get("latency_ratio")
            print(f"{row['recipe']:<18} {row['status']:<9} {row.get('size_bytes', 0) / 1024:>9.0f} {row.get('p50_ms') or 0:>8.1f} "
                  f"{ratio or 0:>8.2f} {1 / ratio if ratio else 0:>7.2f}x {outputs[0].get('map_iou', float('nan')):>8.3f} "
                  f"{outputs[0].get('cosine', float('nan')):>8.4f} {floats!s:>6}  {'; '.join(row['reasons'])[:110]}")
        print(f"\nconversion: {seconds:.0f} s wall ({seconds / args.calibration:.2f} s per calibration image), peak RSS {peak:.0f} MiB")
        from converters.evaluation import prepare_base

        base = prepare_base(model, folder / "base", 20)
        shipped = folder / "shipped.onnx"
        with zipfile.ZipFile(report["bundle"]) as bundle:
            model_file = json.loads(bundle.read("manifest.json")).get("model_file", "model/model.onnx")
            shipped = shipped.with_suffix(Path(model_file).suffix)
            shipped.write_bytes(bundle.read(model_file))
        if shipped.suffix != ".onnx":  # a TFLite choice: the row below times ONNX files only
            shipped = base
        original, simplified, served = interleaved_p50([model, base, shipped], validation[:1])
        print(f"fp32 as exported {original:.1f} ms vs the converter's base graph (pre-processed + simplified) "
              f"{simplified:.1f} ms: {original / simplified:.2f}x")
        print(f"shipped ({report['chosen']}) {served:.1f} ms vs the base graph {simplified:.1f} ms: "
              f"{simplified / served:.2f}x faster (threads not spinning, as the agent runs it)")


if __name__ == "__main__":
    main()
