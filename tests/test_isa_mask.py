"""benchmarks/isa.py: a process with the CPUID mask preloaded sees no AVX-512 and still computes, even
with Python's faulthandler on (it installs its own SIGSEGV handler after the mask's)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
from isa import cpu_features
import onnxruntime
import numpy as np
f = cpu_features()
print(int(bool(f["AVX2"])), int(bool(f["AVX512F"])), int(bool(f["AVX512VNNI"])), float(np.dot(np.arange(64.0), np.ones(64))))
"""


def cpuinfo() -> str:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return ""
    return Path("/proc/cpuinfo").read_text()


def features(env: dict) -> list[str]:
    done = subprocess.run([sys.executable, "-c", CHECK, str(ROOT / "benchmarks")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(not shutil.which("gcc") or "cpuid_fault" not in cpuinfo() or "avx512f" not in cpuinfo(),
                    reason="needs gcc, CPUID faulting and an AVX-512 x86-64 Linux host to hide it from")
def test_the_mask_hides_avx512_and_vnni_but_keeps_avx2():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from isa import mask_library

        library = mask_library()
    except SystemExit as exc:  # gcc present but unable to build (no libc headers)
        pytest.skip(str(exc))
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    plain = features(dict(os.environ))
    assert plain[:2] == ["1", "1"], plain  # the host has them, so the masked runs below prove the mask
    for extra in ({}, {"PYTHONFAULTHANDLER": "1"}):
        masked = features({**os.environ, **extra, "LD_PRELOAD": str(library)})
        assert masked == ["1", "0", "0", "2016.0"], (extra, masked)
