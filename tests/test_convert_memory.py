"""The converter's memory does not grow with the calibration set: calibration ranges, bias-correction
means and sensitivity statistics are accumulated batch by batch, and the runtime runs bounded batches.

A model whose activations are ~40x its input (three 32-channel convolutions at full resolution) is
converted with 8 and with 32 calibration samples through every ONNX int8 recipe; the peak RSS of the
second conversion stays within 1.3x of the first. Kept activations of every sample made it grow by
the samples' activations (measured before the change: 802 -> 1101 MiB, 1.37x; after: 596 -> 621 MiB, 1.04x).
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np

from .conftest import ROOT

#: runs ``edgepack convert`` in this process and reports its own peak RSS (and its children's) in KiB
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


def _peak_rss(tmp_path, samples: int, recipes=("onnx-int8-static", "onnx-int8-mixed", "onnx-fp32"), env=None) -> int:
    rng = np.random.default_rng(samples)
    data = tmp_path / f"calib-{samples}.npy"
    # Smooth images (not white noise): activations with a realistic spread.
    base = rng.uniform(0, 1, (samples, 3, 8, 8)).astype(np.float32)
    np.save(data, np.repeat(np.repeat(base, 16, axis=2), 16, axis=3))
    done = subprocess.run([sys.executable, "-c", MEASURED, "convert", "tests.models:wide_activations",
                           "--input-shape", "x=1,3,128,128", "--profile", "x86-64", "--calibration", data,
                           *[arg for recipe in recipes for arg in ("--recipe", recipe)],
                           "--try-all", "--out", tmp_path / f"out-{samples}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    own, children = map(int, re.search(r"maxrss (\d+) (\d+)", done.stderr).groups())
    return max(own, children)


def test_peak_memory_does_not_grow_with_four_times_the_calibration_samples(tmp_path):
    small, large = _peak_rss(tmp_path, 8), _peak_rss(tmp_path, 32)
    print(f"peak RSS: 8 samples {small / 1024:.0f} MiB, 32 samples {large / 1024:.0f} MiB ({large / small:.2f}x)")
    assert large <= 1.3 * small, (small, large)



def test_histogram_calibration_memory_does_not_grow_either(tmp_path):
    """Entropy calibration (and percentile, distribution: the same collector) runs one range of batches
    at a time too: onnxruntime's own calibrator held every batch's activations, and stacked them once more."""
    import os
    import shutil

    import yaml

    profiles = tmp_path / "profiles"
    shutil.copytree(ROOT / "device-profiles", profiles)
    path = profiles / "x86-64.yaml"
    profile = yaml.safe_load(path.read_text())
    static = next(r for r in profile["recipes"] if isinstance(r, dict) and r["name"] == "onnx-int8-static")
    static["options"]["calibrate_method"] = "entropy"
    path.write_text(yaml.safe_dump(profile))
    env = {**os.environ, "EDGEPACK_PROFILES_DIR": str(profiles)}
    small = _peak_rss(tmp_path, 10, recipes=("onnx-int8-static",), env=env)
    large = _peak_rss(tmp_path, 40, recipes=("onnx-int8-static",), env=env)
    print(f"entropy, peak RSS: 10 samples {small / 1024:.0f} MiB, 40 samples {large / 1024:.0f} MiB ({large / small:.2f}x)")
    assert large <= 1.2 * small, (small, large)
