"""benchmarks/isa.py: a process with the CPUID mask preloaded sees no AVX-512 and still computes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = """
import numpy as np
from numpy._core._multiarray_umath import __cpu_features__ as f
import onnxruntime
print(int(f["AVX2"]), int(f["AVX512F"]), int(f["AVX512VNNI"]), float(np.dot(np.arange(64.0), np.ones(64))))
"""


def features(env: dict) -> list[str]:
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(not shutil.which("gcc") or "cpuid_fault" not in Path("/proc/cpuinfo").read_text()
                    or "avx512f" not in Path("/proc/cpuinfo").read_text(),
                    reason="needs gcc, CPUID faulting and an AVX-512 host to hide it from")
def test_the_mask_hides_avx512_and_vnni_but_keeps_avx2():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from isa import mask_library
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    plain = features(dict(os.environ))
    assert plain[:2] == ["1", "1"], plain  # the host has them, so the masked run below proves the mask
    masked = features({**os.environ, "LD_PRELOAD": str(mask_library())})
    assert masked == ["1", "0", "0", "2016.0"], masked
