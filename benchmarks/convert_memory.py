"""Benchmark: peak memory and time of `edgepack convert` against the number of calibration images.

    python benchmarks/convert_memory.py [--counts 16,64,256] [--size 640] [--model PATH.onnx]

The model is PP-OCRv4's text detector as rapidocr-onnxruntime ships it (DBNet, MobileNetV3 backbone,
4.7 MB; `pip install --no-deps rapidocr-onnxruntime` to get it), else the test suite's
`wide_activations` CNN. The images are photos of text bundled with scikit-image (`text`, `page`),
cut, scaled and flipped into N distinct 640x640 crops with PP-OCR's normalisation. Each count is
converted in a fresh process (`onnx-int8-static` then `onnx-fp32`, the x86-64 profile) whose own
peak RSS is read from getrusage. Target (issue 18): peak RSS within a few times the model's
activations at batch 1 plus the data itself, whatever the count; <= 4 GB and <= 5 min for 64 images.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from overload import cpu_flags  # noqa: E402
from tests.photos import text_images  # noqa: E402

MEASURED = """
import resource, sys
from edgepack.cli import cli
try:
    cli.main(args=sys.argv[1:], prog_name="edgepack")
except SystemExit as exc:
    code = exc.code
print("maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def detector() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # found, not imported (it needs OpenCV)
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
    return path if path.is_file() else None


def convert(model: str, data: Path, out: Path, extra: list[str]) -> tuple[float, float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED, "convert", model, "--profile", "x86-64", "--calibration", str(data),
                           "--recipe", "onnx-int8-static", "--recipe", "onnx-fp32", "--try-all", "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    found = re.search(r"maxrss (\d+) (\d+)", done.stderr)
    peak = max(map(int, found.groups())) / 1024 if found else float("nan")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")] or ["?"]
    status = "ok" if done.returncode == 0 else errors[-1][:160]
    return peak, seconds, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="16,64,256")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--model", help="an ONNX file taking [N, 3, H, W] (default: PP-OCRv4 det, else a test CNN)")
    args = parser.parse_args()
    model = args.model or (str(detector()) if detector() else "tests.models:wide_activations")
    extra = [] if model.endswith(".onnx") else ["--input-shape", f"x=1,3,{args.size},{args.size}"]
    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepack-convert-memory-") as temp:
        for count in counts:
            data = Path(temp) / f"images-{count}.npy"
            images = text_images(count, args.size)
            np.save(data, images)
            data_mib = images.nbytes / 2**20
            del images
            peak, seconds, status = convert(model, data, Path(temp) / f"out-{count}", extra)
            rows.append((count, data_mib, peak, seconds, status))
            data.unlink()
    print(f"model: {Path(model).name if model.endswith('.onnx') else model}, {args.size}x{args.size}, recipes "
          "onnx-int8-static + onnx-fp32 (x86-64), calibration = validation")
    print(f"CPU: {cpu_flags()}")
    print(f"{'images':>7} {'data MiB':>9} {'peak RSS MiB':>13} {'peak - data':>12} {'seconds':>8} {'s/image':>8}  status")
    for count, data_mib, peak, seconds, status in rows:
        print(f"{count:>7} {data_mib:>9.0f} {peak:>13.0f} {peak - data_mib:>12.0f} {seconds:>8.1f} {seconds / count:>8.2f}  {status}")
    if len(rows) > 1:
        print(f"peak RSS minus data, largest vs smallest count: {(rows[-1][2] - rows[-1][1]) / (rows[0][2] - rows[0][1]):.2f}x")


if __name__ == "__main__":
    main()
